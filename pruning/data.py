"""The one place that reads data: the data root, the PPL evaluation texts and the calibration samplers.

Why one module: every protocol detail that changes a published number (which split, how rows are joined, where BOS
goes, how calibration documents are drawn) lives here and in ``pruning.eval.perplexity``, nowhere else.

Data root (DESIGN.md "Data root"): ``$PRUNING_DATA`` if set, else ``../shared/data`` next to the repo, else
``../shared/data`` next to the working directory. Small defaults ship in ``pruning/assets/data`` (see its SOURCE.md)
so a fresh clone can evaluate WikiText-2 and calibrate on C4 with no data root at all; they are rebuilt by

    python -m pruning.data build-assets
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pruning
from pruning.errors import DataError, InfeasibleCalibrationError, PruningError, one_line

if TYPE_CHECKING:
    import torch

ASSETS = Path(pruning.__file__).parent / "assets"
EMBEDDED = ASSETS / "data"

# (dataset, split) -> path under the data root. PTB "validation" is what LLM-Pruner/Search-LLM call test (§1.4).
PPL_FILES: dict[tuple[str, str], str] = {
    ("wikitext2", "test"): "ppl/wikitext2_raw/test.jsonl",
    ("ptb", "validation"): "ppl/ptb/ptb.valid.txt",
    ("ptb", "test"): "ppl/ptb/ptb.test.txt",
    ("c4", "heldout"): "calib/c4/c4_validation_2k.parquet",  # C4_HELDOUT_DOCS: search objectives (AdaPruner)
}
PPL_EMBEDDED: dict[tuple[str, str], str] = {("wikitext2", "test"): "wikitext2_test.jsonl.gz"}

CALIB_FILES: dict[str, str] = {
    "c4": "calib/c4/c4_validation_2k.parquet",
    "alpaca": "calib/alpaca/alpaca_200.json",
    "c4_search": "calib/c4/c4_validation_2k.parquet",  # the c4 documents outside C4_HELDOUT_DOCS
}
# A block of C4 documents that a search (AdaPruner, METHODS.md §3.10) scores candidates on, as PPL text
# ("c4"/"heldout"), so that the objective never saw its calibration data. Search calibration uses "c4_search", the
# other documents (a fresh draw sequence over 1,800 documents). Plain "c4" keeps all 2,000 documents on purpose:
# excluding the block there would change every existing c4 draw sequence that ever reached it (e.g. 128 x 128,
# seed 0 draws document 1977 third), so results already in stores would no longer reproduce.
C4_HELDOUT_DOCS = range(1800, 2000)
CALIB_EMBEDDED: dict[str, str] = {"c4": "c4_validation_256.jsonl.gz"}
# Names people will try that are deliberately refused, with the reason.
CALIB_REFUSED: dict[str, str] = {
    "wikitext2": (
        "only the WikiText-2 *test* split is available offline, and it is an evaluation text; calibrating on "
        "evaluated text makes the pruned model's PPL look better than it is (METHODS.md §1.6). "
        "Use calibration.dataset=c4"
    ),
    "ptb": "PTB validation/test are evaluation texts and PTB train is not in the data root; use c4",
    "bookcorpus": "BookCorpus is not in the offline data root; c4 is the documented substitute (METHODS.md §1.6)",
}
N_C4_EMBEDDED = 256

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)


# --------------------------------------------------------------------------------------------------- data root


def data_root() -> Path | None:
    """Resolved on every call, not cached, so a changed $PRUNING_DATA (tests, notebooks) takes effect."""
    env = os.environ.get("PRUNING_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"$PRUNING_DATA={env!r} is not a directory; point it at a data root such as ../shared/data")
        return root.resolve()
    repo = Path(pruning.__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def _root_file(rel: str) -> Path | None:
    root = data_root()
    if root is None:
        return None
    p = root / rel
    return p if p.is_file() else None


def _missing(rel: str, what: str) -> DataError:
    root = data_root()
    where = f"{root / rel}" if root is not None else f"<no data root>/{rel}"
    return DataError(
        f"{what}: file not found: {where}. Supply it by setting $PRUNING_DATA to a directory containing {rel} "
        f"(the layout of ../shared/data, see its README.md)."
    )


def ppl_source(dataset: str, split: str) -> Path:
    """The file ppl_text would read: the data-root file if present, else the embedded copy (WikiText-2 only).

    Exposed so run code can fail before loading a model and record which copy was read.
    """
    key = (dataset, split)
    if key not in PPL_FILES:
        choices = ", ".join(f"{d}/{s}" for d, s in PPL_FILES)
        raise PruningError(f"unknown PPL dataset/split {dataset}/{split}; choices: {choices}")
    found = _root_file(PPL_FILES[key])
    if found is not None:
        return found
    if key in PPL_EMBEDDED:
        return EMBEDDED / PPL_EMBEDDED[key]
    raise _missing(PPL_FILES[key], f"PPL text for dataset {dataset!r} split {split!r}")


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; a broken line, a non-UTF-8 or truncated file is one line naming the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}: line {n} is not JSON ({e}); restore the file") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {n} is not a JSON object; restore the file")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); restore the file") from None
    return rows


def _text_rows(path: Path, rows: list[dict]) -> list[str]:
    """The ``text`` field of every row; a row without one is one line naming the file."""
    bad = next((i for i, r in enumerate(rows) if not isinstance(r.get("text"), str)), None)
    if bad is not None:
        raise DataError(f"{path}: record {bad} has no string 'text' field; restore the file")
    return [r["text"] for r in rows]


def _plain_text(path: Path) -> str:
    """A UTF-8 text file (PTB); binary content is one line naming the file."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is it a binary file? restore it") from None
    if "\x00" in text:
        raise DataError(f"{path}: contains NUL bytes, so it is binary, not text; restore the file")
    return text


def _memo(read):
    """Memoise a reader by (path, size, mtime): the cell checks a data file before any model work, then reads it
    again to draw or evaluate; the second read is free and a changed file is read anew."""
    cache: dict[tuple, object] = {}

    def wrapper(path: Path, *args):
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns, *args)
        if key not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[key] = read(Path(path), *args)
        return cache[key]

    return wrapper


# --------------------------------------------------------------------------------------------------- PPL texts


def ppl_text(dataset: str, split: str) -> str:
    """The exact string the papers tokenise for PPL (METHODS.md §1.4); any byte difference changes the number.
    An unreadable or empty file is one line naming it (``check_eval`` reads it before any model work)."""
    return _ppl_text(ppl_source(dataset, split), dataset, split)


@_memo
def _ppl_text(path: Path, dataset: str, split: str) -> str:
    if (dataset, split) == ("c4", "heldout"):
        text = "\n\n".join(c4_documents(path, C4_HELDOUT_DOCS))
    elif dataset == "wikitext2":
        # HF rows, empty rows included; the join reproduces "\n\n".join(ds["test"]["text"]).
        text = "\n\n".join(_text_rows(path, _read_jsonl(path)))
    else:
        # PTB: HF ptb_text_only yields sentence = line.strip() for each line of ptb.*.txt. Every line is
        # " words ... \n", so strip() removes the leading space, the trailing space and the newline.
        text = "\n\n".join(line.strip() for line in io.StringIO(_plain_text(path), newline=""))
    if not text.strip():
        raise DataError(f"PPL text {dataset}/{split}: {path} holds no text; restore the file")
    return text


# --------------------------------------------------------------------------------------------------- calibration


def calibration_source(dataset: str) -> Path:
    """The file calibration_texts would read (data root first, then the embedded slice)."""
    if dataset in CALIB_REFUSED:
        raise PruningError(f"calibration dataset {dataset!r} is not allowed: {CALIB_REFUSED[dataset]}")
    if dataset not in CALIB_FILES:
        raise PruningError(f"unknown calibration dataset {dataset!r}; choices: {', '.join(CALIB_FILES)}")
    found = _root_file(CALIB_FILES[dataset])
    if found is not None:
        return found
    if dataset in CALIB_EMBEDDED:
        return EMBEDDED / CALIB_EMBEDDED[dataset]
    raise _missing(CALIB_FILES[dataset], f"calibration data for dataset {dataset!r}")


def _alpaca_text(rec: dict) -> str:
    # The Stanford Alpaca training prompt plus the answer, i.e. what tatsu-lab/alpaca's "text" column holds and
    # what SliceGPT calibrates on; it is also the template LLM-Pruner's LoRA recovery trains on, so calibration
    # sees the same distribution as recovery.
    return alpaca_prompt(rec)


def alpaca_prompt(rec: dict, response: bool = True) -> str:
    """The Alpaca template (alpaca-lora's templates/alpaca.json); ``response=False`` gives the prompt alone, the
    prefix LoRA recovery masks out of the loss (LLM-Pruner's train_on_inputs=False)."""
    tpl = ALPACA_PROMPT_INPUT if rec.get("input") else ALPACA_PROMPT
    return tpl.format(
        instruction=rec["instruction"], input=rec.get("input", ""), output=rec["output"] if response else ""
    )


def instruction_records(dataset: str) -> tuple[list[dict], Path]:
    """{instruction, input, output} records and the file read: a known name (``alpaca``: data root, 200 records)
    or a path to an Alpaca-format .json array / .jsonl (e.g. the full alpaca_data_cleaned.json)."""
    if dataset in CALIB_FILES and dataset != "alpaca":
        raise PruningError(
            f"{dataset!r} is plain text, not instruction records; instruction data: alpaca or a "
            f".json/.jsonl file of {{instruction, input, output}} records"
        )
    path = calibration_source(dataset) if dataset == "alpaca" else Path(dataset).expanduser()
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        raise DataError(
            f"instruction data {dataset!r}: expected the name alpaca or an existing .json/.jsonl file "
            f"of {{instruction, input, output}} records"
        )
    try:
        recs = _read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"instruction data {path}: unreadable ({e})") from e
    if not isinstance(recs, list) or not recs:
        raise DataError(f"instruction data {path}: expected a non-empty list of records")
    bad = next(
        (i for i, r in enumerate(recs) if not (isinstance(r, dict) and "instruction" in r and "output" in r)), None
    )
    if bad is not None:
        raise DataError(f"instruction data {path}: record {bad} lacks instruction/output (Alpaca format expected)")
    return recs, path


def calibration_texts(dataset: str) -> list[str]:
    """Documents (one string each) for the calibration sampler; order is the file's, so seeds are reproducible.
    An unreadable file, or one without documents, is one line naming it (``calibration_spec`` reads it first)."""
    return list(_calibration_texts(calibration_source(dataset), dataset))


@_memo
def _calibration_texts(path: Path, dataset: str) -> list[str]:
    if path.name.endswith(".jsonl.gz"):
        texts = _text_rows(path, _read_jsonl(path))
    elif dataset == "c4":
        texts = c4_documents(path)
    elif dataset == "c4_search":
        held = set(C4_HELDOUT_DOCS)
        texts = [t for i, t in enumerate(c4_documents(path)) if i not in held]
    elif dataset == "alpaca":
        texts = [_alpaca_text(r) for r in instruction_records(dataset)[0]]
    else:
        raise AssertionError(dataset)  # pragma: no cover
    if not any(t.strip() for t in texts):
        raise DataError(f"calibration data for dataset {dataset!r}: {path} holds no documents; restore the file")
    return texts


def c4_documents(path: Path, rows: range | None = None) -> list[str]:
    """The C4 parquet's ``text`` column in file order (optionally only ``rows``); a file that is not parquet, has
    no ``text`` column or no string documents is one line naming it."""
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
        if "text" not in columns:
            raise DataError(f"C4 parquet {path} has no 'text' column (columns: {columns}); restore the file")
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"C4 parquet {path} is unreadable ({one_line(e)}); restore the file") from None
    if not docs:
        raise DataError(f"C4 parquet {path} has no rows; restore the file")
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise DataError(f"C4 parquet {path}: row {bad} has no text (null); restore the file")
    return docs if rows is None else docs[rows.start : rows.stop]


def _tokenizer_key(tokenizer) -> tuple:
    return (
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "add_bos_token", None),
    )


# ------------------------------------------------------------------------------------------- calibration samplers

# Each official code's way of drawing calibration tokens (METHODS.md §1.6), replayed over the data root's documents.
SAMPLERS: dict[str, str] = {
    "llm_pruner": "random document, tokenised alone, >= L tokens, no repeats, random window (LLM-Pruner)",
    "nirvana": "as llm_pruner over the documents longer than L characters (NIRVANA get_bookcorpus)",
    "stream": "documents joined with `join`, tokenised once, random windows, overlaps allowed (FLAP, Search-LLM)",
    "wanda": "random document with more than L tokens, random window, repeats allowed (FLAP get_c4, Wanda-SP)",
    "slicegpt": "consecutive documents joined with \\n\\n until L tokens, used documents removed (SliceGPT)",
    "documents": "every document (or n_samples of them) cut into consecutive L-token windows, tails kept (ShortGPT)",
    "first_docs": "the first n_samples documents in file order, their first L tokens (parity tests)",
}
ORDERS = ("random", "file")  # file: documents (stream windows) in file order instead of drawn at random
CALIB_FIELDS = ("sampler", "dataset", "n_samples", "seq_len", "seed", "order", "join", "paper_dataset")
VARIABLE_LENGTH_SAMPLERS = ("documents",)


@dataclass(frozen=True)
class CalibrationSpec:
    """A validated ``calibration`` config. ``paper_dataset`` only labels the record (the paper's dataset that
    ``dataset`` substitutes); every other field changes the drawn tokens."""

    sampler: str
    dataset: str
    n_samples: int | None  # documents: number of documents (None: all); otherwise number of samples
    seq_len: int  # documents: the window length (and stride)
    seed: int
    order: str = "random"
    join: str | None = None  # stream only: the string the documents are joined with
    paper_dataset: str | None = None

    @property
    def variable_length(self) -> bool:
        """True when the sampler gives windows of different lengths (a list of 1-D tensors, not [n, L])."""
        return self.sampler in VARIABLE_LENGTH_SAMPLERS

    def draw_key(self) -> dict:
        """The fields the token ids depend on (for cache keys)."""
        return {k: getattr(self, k) for k in CALIB_FIELDS if k != "paper_dataset"}


def calibration_spec(cfg) -> CalibrationSpec:
    """Check a ``calibration`` config (mapping or Hydra node) and return it as a spec; one line per mistake.

    Cheap (no tokenizer, no model): the cell calls it first. A missing ``sampler`` means ``llm_pruner``, the only
    sampler before there was a choice, so old configs and records keep their meaning.
    """
    c = dataclasses.asdict(cfg) if isinstance(cfg, CalibrationSpec) else dict(cfg)  # a replace()d spec: re-check
    unknown = sorted(set(c) - set(CALIB_FIELDS))
    if unknown:
        raise PruningError(f"unknown calibration keys {unknown}; valid: {', '.join(CALIB_FIELDS)}")
    sampler = c.get("sampler") or "llm_pruner"
    if sampler not in SAMPLERS:
        raise PruningError(f"unknown calibration.sampler {sampler!r}; choices: {', '.join(SAMPLERS)}")
    order = c.get("order") or "random"
    if order not in ORDERS:
        raise PruningError(f"calibration.order must be one of {', '.join(ORDERS)}, got {order!r}")
    if sampler == "first_docs" and order != "file":
        raise PruningError(
            "calibration.sampler=first_docs is deterministic: set calibration.order=file (or use "
            "sampler=llm_pruner for a random draw)"
        )
    join = c.get("join")
    if sampler == "stream":
        if not isinstance(join, str):
            raise PruningError(
                f"calibration.sampler=stream needs calibration.join, the string the documents are "
                f"joined with (FLAP ' ', Search-LLM '\\n\\n'); got {join!r}"
            )
    elif join is not None:
        raise PruningError(f"calibration.join is only used by sampler=stream; set it to null for sampler={sampler}")
    for key in ("dataset", "seq_len", "seed"):
        if c.get(key) is None:
            raise PruningError(f"calibration.{key} is required")

    def whole(key: str, least: int):
        v = c.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise PruningError(f"calibration.{key} must be an int >= {least}, got {v!r}")
        return v

    n = c.get("n_samples")
    if not (sampler == "documents" and n is None):
        n = whole("n_samples", 1)
    seq_len = whole("seq_len", 2)
    seed = whole("seed", 0)
    paper = c.get("paper_dataset")
    if paper is not None and not isinstance(paper, str):
        raise PruningError(f"calibration.paper_dataset must be a dataset name or null, got {paper!r}")
    calibration_texts(str(c["dataset"]))  # unknown / refused / missing / unreadable file: one line now
    return CalibrationSpec(sampler, str(c["dataset"]), n, seq_len, seed, order, join, paper)


def draw_calibration(tokenizer, spec, progress: bool = True):
    """Calibration token ids as the spec's sampler draws them: a LongTensor [n_samples, seq_len], or, for
    variable-length samplers (``documents``; ``slicegpt`` when a re-tokenised sample comes out short), a list of
    1-D LongTensors. A shape the data cannot fill raises InfeasibleCalibrationError before returning anything."""
    spec = calibration_spec(spec)
    texts = calibration_texts(spec.dataset)
    draw = {
        "llm_pruner": _draw_llm_pruner,
        "nirvana": _draw_nirvana,
        "stream": _draw_stream,
        "wanda": _draw_wanda,
        "slicegpt": _draw_slicegpt,
        "documents": _draw_documents,
        "first_docs": _draw_first_docs,
    }[spec.sampler]
    return draw(tokenizer, texts, spec, progress)


def calibration_batches(
    tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int, progress: bool = True
) -> torch.LongTensor:
    """LLM-Pruner's sampler (example_samples.py, METHODS.md §1.6), with its exact draw sequence for a given seed."""
    spec = calibration_spec(
        {"sampler": "llm_pruner", "dataset": dataset, "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
    )
    return draw_calibration(tokenizer, spec, progress)


# (tokenizer key, text digest) -> {doc index: token ids}; documents are tokenised lazily, only when drawn.
_DOC_TOKENS: dict[tuple, dict[int, list[int]]] = {}
# (tokenizer key, text digest, join) -> token ids of the joined stream
_STREAM_TOKENS: dict[tuple, list[int]] = {}


def _digest(texts: list[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()


class _Docs:
    """Documents of one calibration text, tokenised alone with the tokenizer's defaults (BOS included), on demand
    and memoised per (tokenizer, text content)."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts
        self.cache = _DOC_TOKENS.setdefault((_tokenizer_key(tokenizer), _digest(texts)), {})

    def __getitem__(self, i: int) -> list[int]:
        ids = self.cache.get(i)
        if ids is None:
            ids = self.cache[i] = self.tokenizer(self.texts[i]).input_ids
        return ids


def _infeasible(spec: CalibrationSpec, have: int, of: int, what: str) -> InfeasibleCalibrationError:
    return InfeasibleCalibrationError(
        f"calibration dataset {spec.dataset!r} has only {have} of {of} {what}, fewer than n_samples="
        f"{spec.n_samples} (sampler {spec.sampler}, order {spec.order}); lower calibration n_samples or seq_len"
    )


def _random_documents(
    tokenizer,
    texts: list[str],
    pool: list[int],
    spec: CalibrationSpec,
    min_len: int,
    unique: bool,
    what: str,
    progress: bool,
):
    """The document draw loop shared by LLM-Pruner, NIRVANA and Wanda-SP, with the official draw sequence.

    ``random.seed(seed)``, then per sample: redraw ``randint(0, len(pool) - 1)`` (tokenising that document alone)
    until it has >= ``min_len`` tokens (and, if ``unique``, was not drawn before), then a window starting at
    ``randint(0, len - min_len)``. ``order=file``: the qualifying documents in file order, their first tokens.
    Only drawn documents are tokenised; once all of the pool is tokenised we know whether the shape can be filled
    and fail instead of looping.
    """
    import torch
    from tqdm.auto import tqdm

    n, L = spec.n_samples, spec.seq_len
    if n is None:  # only sampler=documents reads every document
        raise InfeasibleCalibrationError(f"calibration sampler {spec.sampler} needs n_samples")
    docs = _Docs(tokenizer, texts)
    rows: list[list[int]] = []
    if spec.order == "file":
        for i in pool:
            if len(docs[i]) >= min_len:
                rows.append(docs[i][:L])
                if len(rows) == n:
                    return torch.tensor(rows, dtype=torch.long)
        raise _infeasible(spec, len(rows), len(pool), what)

    def qualifying() -> int:
        return sum(len(docs.cache[i]) >= min_len for i in pool if i in docs.cache)

    def check_all_seen() -> None:
        """Called once every pool document is tokenised: fail if the rest of the draw cannot be filled."""
        q = qualifying()
        if unique and q - len(used) < n - len(rows):
            raise _infeasible(spec, q, len(pool), what)
        if not unique and q == 0:
            raise InfeasibleCalibrationError(
                f"calibration dataset {spec.dataset!r} has 0 of {len(pool)} {what}; "
                f"sampler {spec.sampler} needs at least one; lower calibration seq_len"
            )

    used: set[int] = set()
    if not pool or (unique and n > len(pool)):
        for i in pool:  # count exactly for the message
            docs[i]
        check_all_seen()
    seen = sum(i in docs.cache for i in pool)
    if seen == len(pool):
        check_all_seen()
    rng = random.Random(spec.seed)  # the same stream as the official random.seed(seed)
    bar = tqdm(
        total=n, desc=f"calibration {spec.dataset} ({spec.sampler})", unit="sample", disable=not progress, delay=1.0
    )
    try:
        for _ in range(n):
            while True:
                k = rng.randint(0, len(pool) - 1)
                i = pool[k]
                if i not in docs.cache:
                    docs[i]
                    seen += 1
                    bar.set_postfix(docs_tokenised=seen, refresh=False)
                    if seen == len(pool):
                        check_all_seen()
                ids = docs[i]
                if len(ids) >= min_len and not (unique and k in used):
                    used.add(k)
                    break
            j = rng.randint(0, len(ids) - min_len)
            rows.append(ids[j : j + L])
            bar.update(1)
    finally:
        bar.close()
    return torch.tensor(rows, dtype=torch.long)


def _draw_llm_pruner(tokenizer, texts, spec, progress):
    return _random_documents(
        tokenizer,
        texts,
        list(range(len(texts))),
        spec,
        spec.seq_len,
        True,
        f"documents with >= {spec.seq_len} tokens",
        progress,
    )


def _draw_nirvana(tokenizer, texts, spec, progress):
    # get_bookcorpus: dataset.filter(len(text) > seq_len) on characters, then LLM-Pruner's loop over what is left
    pool = [i for i, t in enumerate(texts) if len(t) > spec.seq_len]
    return _random_documents(
        tokenizer,
        texts,
        pool,
        spec,
        spec.seq_len,
        True,
        f"documents longer than {spec.seq_len} characters with >= {spec.seq_len} tokens",
        progress,
    )


def _draw_wanda(tokenizer, texts, spec, progress):
    # FLAP lib/data.py get_c4: `if len > seqlen: break` (strict, repeats allowed), window randint(0, len - L - 1)
    return _random_documents(
        tokenizer,
        texts,
        list(range(len(texts))),
        spec,
        spec.seq_len + 1,
        False,
        f"documents with more than {spec.seq_len} tokens",
        progress,
    )


def _draw_first_docs(tokenizer, texts, spec, progress):
    import torch

    n, L = spec.n_samples, spec.seq_len
    if n > len(texts):
        raise _infeasible(spec, len(texts), len(texts), "documents")
    docs = _Docs(tokenizer, texts)
    short = next((i for i in range(n) if len(docs[i]) < L), None)
    if short is not None:
        raise InfeasibleCalibrationError(
            f"calibration sampler first_docs: document {short} of {spec.dataset!r} has {len(docs[short])} tokens, "
            f"fewer than seq_len={L}; lower calibration seq_len or n_samples, or use sampler=llm_pruner order=file"
        )
    return torch.tensor([docs[i][:L] for i in range(n)], dtype=torch.long)


def _draw_stream(tokenizer, texts, spec, progress):
    """FLAP / Search-LLM get_wikitext2: ``tokenizer(join.join(docs))`` once, ``random.seed(seed)``, windows
    ``[i, i + L)`` with ``i = randint(0, N - L - 1)``. ``order=file``: consecutive non-overlapping windows from the
    start of the stream."""
    import torch

    key = (_tokenizer_key(tokenizer), _digest(texts), spec.join)
    ids = _STREAM_TOKENS.get(key)
    if ids is None:
        ids = _STREAM_TOKENS[key] = tokenizer(spec.join.join(texts)).input_ids
    n, L, N = spec.n_samples, spec.seq_len, len(ids)
    if spec.order == "file":
        if n * L > N:
            raise InfeasibleCalibrationError(
                f"calibration stream of {spec.dataset!r} joined with {spec.join!r} has {N} tokens, fewer than "
                f"n_samples x seq_len = {n} x {L} consecutive windows (order file); lower n_samples or seq_len"
            )
        return torch.tensor(ids[: n * L], dtype=torch.long).reshape(n, L)
    if N - L - 1 < 0:
        raise InfeasibleCalibrationError(
            f"calibration stream of {spec.dataset!r} has {N} tokens, too few for one window of seq_len={L} "
            f"(randint(0, N - L - 1)); lower calibration seq_len"
        )
    rng = random.Random(spec.seed)
    starts = [rng.randint(0, N - L - 1) for _ in range(n)]
    return torch.tensor([ids[i : i + L] for i in starts], dtype=torch.long)


def _draw_slicegpt(tokenizer, texts, spec, progress):
    """TransformerCompression prepare_dataloader (varied_seqlen=False): drop empty documents; ``torch.manual_seed
    (seed)``; per sample a start ``torch.randint(0, len(indices))`` among the unused documents, then that document
    and the next ones, each ``tokenizer.tokenize("\\n\\n" + doc)`` (no separator before the first), until >= L
    tokens; the documents it read are removed; a sample that reaches L is truncated to L tokens, turned back into a
    string and tokenised again with truncation to L (so a BOS leads where the tokenizer adds one).
    ``order=file``: the start is always the first unused document.

    The official loader then visits the samples in a random permutation; only the order changes, so they are kept
    in the order drawn. A sample whose re-tokenisation is shorter than L (the official code pads it and masks the
    padding) makes the result a list of 1-D tensors.
    """
    import torch

    n, L = spec.n_samples, spec.seq_len
    data = [t for t in texts if len(t) > 0]
    gen = torch.Generator().manual_seed(spec.seed)
    indices = list(range(len(data)))
    samples: list[list[int]] = []
    while len(samples) < n and indices:
        start = int(torch.randint(0, len(indices), (1,), generator=gen).item()) if spec.order == "random" else 0
        idx = start
        tokens: list[str] = []
        while len(tokens) < L and idx < len(indices):
            tokens += tokenizer.tokenize(("\n\n" if tokens else "") + data[indices[idx]])
            idx += 1
        indices = indices[:start] + indices[idx:]
        if len(tokens) >= L:
            text = tokenizer.convert_tokens_to_string(tokens[:L])
            samples.append(tokenizer(text, truncation=True, max_length=L).input_ids)
    if len(samples) < n:
        raise InfeasibleCalibrationError(
            f"calibration sampler slicegpt: {spec.dataset!r} gives only {len(samples)} samples of {L} tokens "
            f"(consecutive documents joined with '\\n\\n'), fewer than n_samples={n}; lower n_samples or seq_len"
        )
    if all(len(s) == L for s in samples):
        return torch.tensor(samples, dtype=torch.long)
    return [torch.tensor(s, dtype=torch.long) for s in samples]


def _draw_documents(tokenizer, texts, spec, progress):
    """ShortGPT run_shortgpt.py: every document tokenised whole (batch 1, tokenizer defaults) and cut into
    consecutive windows of L tokens (its ``stride``), the shorter tail kept. ``n_samples`` documents (None: all):
    the first ones for ``order=file``, else the first of ``torch.randperm(seed)``. The official code visits every
    document in shuffled order; over all documents the order changes nothing but the summation order."""
    import torch
    from tqdm.auto import tqdm

    n, L = spec.n_samples, spec.seq_len
    if n is not None and n > len(texts):
        raise _infeasible(spec, len(texts), len(texts), "documents")
    order = (
        range(len(texts))
        if spec.order == "file"
        else torch.randperm(len(texts), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    )
    chosen = list(order)[: len(texts) if n is None else n]
    docs = _Docs(tokenizer, texts)
    windows = []
    for i in tqdm(chosen, desc=f"calibration {spec.dataset} (documents)", unit="doc", disable=not progress, delay=1.0):
        ids = torch.tensor(docs[i], dtype=torch.long)
        windows += list(ids.split(L))
    return windows


# --------------------------------------------------------------------------------------------------- assets


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _gzip_bytes(raw: bytes) -> bytes:
    # filename="" and mtime=0 keep the header free of paths and times, so rebuilding is byte-identical.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


_SOURCE_MD = """\
# Embedded data defaults

Small copies of the offline data root (`../shared/data`) so that a fresh clone can evaluate WikiText-2 PPL and
calibrate on C4 with no data root. `pruning.data` reads the data root first and falls back to these files only when
the data-root file is absent. Rebuild (byte-identical; gzip header has no name and mtime 0):

    python -m pruning.data build-assets            # reads the current data root, writes pruning/assets/data/

| file | bytes | sha256 (.gz) | sha256 (decompressed) | derived from |
|---|---|---|---|---|
{rows}

## wikitext2_test.jsonl.gz

Byte-identical (after decompression) to the data root's `ppl/wikitext2_raw/test.jsonl`: the 4,358 rows of HF
`wikitext` / `wikitext-2-raw-v1` **test**, one `{{"text": ...}}` per line, empty rows included. Origin and derivation:
`../shared/data/ppl/wikitext2_raw/SOURCE.md` (source sha256 {wt_src}), itself split back into rows from the
blank-line-joined CRLF text of Deathnetworks/rotorquant:wikitext-test.txt@c5be50f038e68e35740efdf4c6f5d65d61c2485b.
WikiText (Merity et al. 2016, Salesforce): licence **CC BY-SA 3.0** (and GFDL); redistributed under the same licence.

## c4_validation_256.jsonl.gz

The first {n_c4} documents (row order of the file) of the data root's `calib/c4/c4_validation_2k.parquet`, column
`text` only, one `{{"text": ...}}` per line (`json.dumps(ensure_ascii=False)`). That parquet holds 2,000 C4-en
validation documents, copied from yxanul/yxanul_0.6B:validation/c4_validation_2k.parquet@d3ef06095f54f9e2a78c0abca1472a0188a5e1e9
(details in `../shared/data/calib/c4/SOURCE.md`; source sha256 {c4_src}). C4 (allenai/c4): licence **ODC-BY**.
Calibration drawn from this 256-document slice differs from calibration drawn from the full 2,000-document parquet
at the same seed, so a result row should record `pruning.data.calibration_source(dataset)`.

The .gz bytes depend on the zlib build (level 9); the decompressed sha256 is the stable identity.
"""  # noqa: E501 - a commit URL in the generated SOURCE.md cannot be wrapped


def build_assets(root: Path | None = None, out: Path = EMBEDDED) -> list[Path]:
    """Regenerate the embedded defaults from a data root; committed so the assets can be audited and rebuilt."""
    import pyarrow.parquet as pq

    root = Path(root) if root is not None else data_root()
    if root is None:
        raise DataError("build-assets needs a data root: set $PRUNING_DATA or pass --data-root")
    wt_src, c4_src = root / PPL_FILES[("wikitext2", "test")], root / CALIB_FILES["c4"]
    for p, what in ((wt_src, "wikitext2 test"), (c4_src, "c4 calibration")):
        if not p.is_file():
            raise DataError(f"build-assets: {what} file not found: {p}")
    out.mkdir(parents=True, exist_ok=True)

    wt_raw = wt_src.read_bytes()
    c4_docs = pq.read_table(c4_src, columns=["text"]).column("text").to_pylist()[:N_C4_EMBEDDED]
    c4_raw = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in c4_docs).encode("utf-8")

    rows, written = [], []
    for name, raw, src in (
        (PPL_EMBEDDED[("wikitext2", "test")], wt_raw, "ppl/wikitext2_raw/test.jsonl"),
        (CALIB_EMBEDDED["c4"], c4_raw, f"calib/c4/c4_validation_2k.parquet, rows 0-{N_C4_EMBEDDED - 1}, column text"),
    ):
        gz = _gzip_bytes(raw)
        (out / name).write_bytes(gz)
        written.append(out / name)
        rows.append(f"| {name} | {len(gz)} | {_sha256_bytes(gz)} | {_sha256_bytes(raw)} | {src} |")
    md = _SOURCE_MD.format(
        rows="\n".join(rows),
        wt_src=_sha256_bytes(wt_raw),
        c4_src=_sha256_bytes(c4_src.read_bytes()),
        n_c4=N_C4_EMBEDDED,
    )
    (out / "SOURCE.md").write_text(md, encoding="utf-8")
    written.append(out / "SOURCE.md")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruning.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-assets", help="rebuild pruning/assets/data from the data root")
    b.add_argument("--data-root", type=Path, default=None, help="default: the resolved data root")
    b.add_argument("--out", type=Path, default=EMBEDDED)
    args = parser.parse_args(argv)
    if args.cmd == "build-assets":
        for p in build_assets(args.data_root, args.out):
            print(f"{p}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
