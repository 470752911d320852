"""Local data -> the documents lm-eval's own tasks see, plus verbatim copies of lm-eval 0.4.13's task functions.

Why this shape: the papers' numbers come from lm-eval's task definitions, which read HF hub datasets. The hub is
unreachable here, so each ``load_<task>`` rebuilds the *HF dataset schema* of the task (same field names, same
types) from the release files in the data root; the prompt functions then run unchanged. Everything below the
"copied from lm-eval" line is a verbatim copy (tests/test_zeroshot.py checks it gives the installed harness's
output on every local document), so a harness upgrade that changes a prompt is noticed.

Format differences that remain (the rest round-trips exactly):
- HellaSwag: the local copy is llama.cpp's preprocessed text (see its SOURCE.md), so ``ctx_a``/``ctx_b`` are
  rebuilt: for ActivityNet items (activity label not a WikiHow category) whose context ends in a lower-case
  fragment after the last ". ", that fragment is ``ctx_b`` (3,236 of the 3,243 ActivityNet items), else
  ``ctx_b = ""`` (every WikiHow item has an empty ``ctx_b`` in the original). lm-eval's ``process_docs`` then
  capitalises ``ctx_b`` and re-applies its own bracket/space cleaning, exactly as on the original. Residual
  differences: 7 ActivityNet items whose fragment does not start lower-case keep their original case after the
  first letter (lm-eval's ``capitalize()`` lower-cases it), and llama.cpp's space collapsing / removal of only the
  known tags may differ from lm-eval's single-pass ``"  " -> " "`` on a handful of items.
- WinoGrande: parsed back out of the LLM-Adapters instruction format; ``answer`` is checked against the original
  ``dev-labels.lst``. qID is lost (lm-eval does not use it).
- OpenBookQA: the release TSV's "(A) .. (B) .." choice string is split back into the four choice texts.
"""

from __future__ import annotations

import bz2
import csv
import json
import re
from pathlib import Path

import datasets

from pruning.errors import DataError

# The 21 WikiHow top-level categories that occur as HellaSwag activity labels (6,799 validation items); every
# other label is an ActivityNet activity (3,243 items). Counted on the local file; the split matches the paper's.
WIKIHOW_CATEGORIES = frozenset(
    {
        "Arts and Entertainment",
        "Cars & Other Vehicles",
        "Computers and Electronics",
        "Education and Communications",
        "Family Life",
        "Finance and Business",
        "Food and Entertaining",
        "Health",
        "Hobbies and Crafts",
        "Holidays and Traditions",
        "Home and Garden",
        "Home,Categories",
        "Personal Care and Style",
        "Pets and Animals",
        "Philosophy and Religion",
        "Relationships",
        "Sports and Fitness",
        "Travel",
        "Uncategorized",
        "Work World",
        "Youth",
    }
)


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; the file does not have the format its SOURCE.md describes")


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _dataset(split: str, rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# ----------------------------------------------------------------------------------------------- local loaders
# Each returns the rows in file order with the HF schema lm-eval's task reads.


def load_boolq(files: dict[str, Path]) -> list[dict]:
    """aps/super_glue boolq: question, passage ("<title> -- <passage>"), idx, label (0 = False, 1 = True)."""
    rows = []
    for r in _jsonl(files["data"]):
        label = str(r["label"]).lower()
        if label not in ("true", "false"):
            raise _bad(files["data"], f"label {r['label']!r} is not true/false")
        rows.append(
            {"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]), "label": int(label == "true")}
        )
    return rows


def load_piqa(files: dict[str, Path]) -> list[dict]:
    """baber/piqa: goal, sol1, sol2, label (0 => sol1); labels come from the aligned valid-labels.lst."""
    docs, labels = _jsonl(files["data"]), _lines(files["labels"])
    if len(docs) != len(labels):
        raise _bad(files["labels"], f"{len(labels)} labels for {len(docs)} documents")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def _arc_rows(path: Path) -> list[dict]:
    rows = []
    for r in _jsonl(path):
        q = r["question"]
        rows.append(
            {
                "id": r["id"],
                "question": q["stem"],
                "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
                "answerKey": r["answerKey"],
            }
        )
    return rows


def load_arc_easy(files: dict[str, Path]) -> list[dict]:
    """allenai/ai2_arc ARC-Easy test: id, question (the stem), choices {text, label}, answerKey."""
    return _arc_rows(files["data"])


def load_arc_challenge(files: dict[str, Path]) -> list[dict]:
    return _arc_rows(files["data"])


_OBQA_CHOICE = re.compile(r"\(([A-D])\) ")


def load_openbookqa(files: dict[str, Path]) -> list[dict]:
    """allenai/openbookqa main test: id, question_stem, choices {text, label}, answerKey."""
    path = files["data"]
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["ID", "Question Stem", "Choices"] or header[-1] != "Answer Key":
            raise _bad(path, f"unexpected header {header}")
        rows = []
        for rec in reader:
            qid, stem, choices, _, key = rec
            parts = _OBQA_CHOICE.split(" " + choices.strip() + " ")
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            if labels != ["A", "B", "C", "D"] or parts[0].strip():
                raise _bad(path, f"item {qid}: cannot split choices {choices!r} into (A)..(D)")
            rows.append(
                {"id": qid, "question_stem": stem, "choices": {"text": texts, "label": labels}, "answerKey": key}
            )
    return rows


_WINO = re.compile(
    r"Please choose the correct answer to fill in the blank to complete the given sentence: (?P<sentence>.*)\n\n"
    r"Option1: (?P<option1>.*) Option2: (?P<option2>.*) Answer format: option1/option2",
    re.S,
)


def load_winogrande(files: dict[str, Path]) -> list[dict]:
    """allenai/winogrande winogrande_xl validation: sentence, option1, option2, answer ("1" | "2")."""
    path = files["data"]
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    labels = _lines(files["labels"])
    if len(items) != len(labels):
        raise _bad(files["labels"], f"{len(labels)} labels for {len(items)} items")
    rows = []
    for i, (it, label) in enumerate(zip(items, labels)):
        m = _WINO.fullmatch(it["instruction"])
        if m is None or it["instruction"].count(" Option2: ") != 1 or m["sentence"].count("_") != 1:
            raise _bad(path, f"item {i}: cannot parse sentence/options from {it['instruction'][:80]!r}")
        answer = it["answer"].removeprefix("option")
        if answer != label:
            raise _bad(path, f"item {i}: answer option{answer} disagrees with dev-labels.lst ({label})")
        rows.append({"sentence": m["sentence"], "option1": m["option1"], "option2": m["option2"], "answer": answer})
    return rows


def load_hellaswag(files: dict[str, Path]) -> list[dict]:
    """Rowan/hellaswag validation: activity_label, ctx_a, ctx_b, ctx, endings, label (str); see module docstring."""
    path = files["data"]
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _bad(path, f"{len(lines)} lines is not a multiple of 6")
    rows = []
    for k in range(0, len(lines), 6):
        head, label, endings = lines[k], lines[k + 1], lines[k + 2 : k + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep or label not in ("0", "1", "2", "3"):
            raise _bad(path, f"item {k // 6}: bad context line {head[:60]!r} or label {label!r}")
        ctx_a, ctx_b = ctx, ""
        if activity not in WIKIHOW_CATEGORIES:
            before, dot, tail = ctx.rpartition(". ")
            if dot and tail[:1].islower():
                ctx_a, ctx_b = before + ".", tail
        rows.append(
            {
                "activity_label": activity,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a,
                "endings": endings,
                "label": label,
            }
        )
    return rows


# ------------------------------------------------------------------------- copied from lm-eval 0.4.13, verbatim
# lm_eval/tasks/hellaswag/utils.py


def preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        out_doc = {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }
        return out_doc

    return dataset.map(_process_doc)


# lm_eval/tasks/winogrande/preprocess_winogrande.py (lm-eval's "partial evaluation": the choices are the two
# contexts "sentence up to _ + option", the one continuation is the rest of the sentence, and doc_to_text returns
# the gold *context* index)


def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
