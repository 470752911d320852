"""The seven zero-shot tasks of LLM-Pruner's table, re-declared for lm-eval on the local data root.

Each entry is lm-eval 0.4.13's own task YAML (named in ``yaml``) with only the data source changed: the hub
``dataset_path`` becomes a ``custom_dataset`` built from the data root's release files (``utils.load_<task>``
rebuilds the HF schema). Prompts, choices, targets, delimiters and the evaluated split are copied verbatim;
tests/test_zeroshot.py compares them with the installed YAMLs. Two deliberate changes, both metric-only:
``acc_norm`` is added to BoolQ (lm-eval computes it from the same log-likelihoods; its YAML lists only ``acc``),
and training/validation splits that are not evaluated are dropped (0-shot never reads them).
WinoGrande keeps ``acc`` only: its partial scoring has one continuation for both contexts, so length
normalisation is undefined (lm-eval would divide by the *context* lengths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruning.eval.tasks import utils

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


@dataclass(frozen=True)
class LocalTask:
    name: str
    yaml: str  # the installed lm-eval YAML this copies (relative to lm_eval/tasks)
    files: dict[str, str]  # role -> path under the data root
    n_docs: int  # documents in the local file (METHODS.md §1.5 table)
    split: str  # the split lm-eval evaluates for this task
    loader: Callable[[dict[str, Path]], list[dict]]
    prompt: dict[str, Any]  # lm-eval config keys copied from the YAML
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, paths: dict[str, Path], first: int | None = None, sizes: dict | None = None) -> dict[str, Any]:
        """An lm-eval task dict; ``custom_dataset`` reads the local files when lm-eval asks for the data.

        ``first``: only the first documents reach lm-eval (what its ``limit`` evaluates anyway), so a quick run
        does not preprocess all 10,042 HellaSwag documents; ``sizes[name]`` then keeps the file's full count."""
        name, split, loader = self.name, self.split, self.loader

        def custom_dataset(**_):
            rows = loader(paths)
            if sizes is not None:
                sizes[name] = len(rows)
            return utils._dataset(split, rows if first is None else rows[:first])

        return {
            "task": self.name,
            "dataset_path": f"local:{self.name}",  # never used: custom_dataset takes precedence
            "custom_dataset": custom_dataset,
            "output_type": "multiple_choice",
            f"{split}_split": split,
            **self.prompt,
            "metric_list": [dict(ACC) if m == "acc" else dict(ACC_NORM) for m in self.metrics],
            "num_fewshot": 0,
            "metadata": {"version": self.extra.get("version", 1.0), "source": {k: str(p) for k, p in paths.items()}},
        }


_ARC_PROMPT = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
}

TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask(
            "boolq",
            "super_glue/boolq/default.yaml",
            {"data": "zeroshot/boolq/val.jsonl"},
            3270,
            "validation",
            utils.load_boolq,
            {
                "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                "doc_to_target": "label",
                "doc_to_choice": ["no", "yes"],
            },
            extra={"version": 2.0},
        ),
        LocalTask(
            "piqa",
            "piqa/piqa.yaml",
            {"data": "zeroshot/piqa/valid.jsonl", "labels": "zeroshot/piqa/valid-labels.lst"},
            1838,
            "validation",
            utils.load_piqa,
            {
                "doc_to_text": "Question: {{goal}}\nAnswer:",
                "doc_to_target": "label",
                "doc_to_choice": "{{[sol1, sol2]}}",
            },
        ),
        LocalTask(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            {"data": "zeroshot/hellaswag/hellaswag_val_full.txt.bz2"},
            10042,
            "validation",
            utils.load_hellaswag,
            {
                "process_docs": utils.process_docs,
                "doc_to_text": "{{query}}",
                "doc_to_target": "{{label}}",
                "doc_to_choice": "choices",
            },
        ),
        LocalTask(
            "winogrande",
            "winogrande/default.yaml",
            {
                "data": "zeroshot/winogrande/dev_llm-adapters-format.json",
                "labels": "zeroshot/winogrande/dev-labels.lst",
            },
            1267,
            "validation",
            utils.load_winogrande,
            {
                "doc_to_text": utils.winogrande_doc_to_text,
                "doc_to_target": utils.winogrande_doc_to_target,
                "doc_to_choice": utils.winogrande_doc_to_choice,
            },
            metrics=("acc",),
        ),
        LocalTask(
            "arc_easy",
            "arc/arc_easy.yaml",
            {"data": "zeroshot/arc/ARC-Easy-Test.jsonl"},
            2376,
            "test",
            utils.load_arc_easy,
            _ARC_PROMPT,
        ),
        LocalTask(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            {"data": "zeroshot/arc/ARC-Challenge-Test.jsonl"},
            1172,
            "test",
            utils.load_arc_challenge,
            _ARC_PROMPT,
        ),
        LocalTask(
            "openbookqa",
            "openbookqa/openbookqa.yaml",
            {"data": "zeroshot/openbookqa/test.tsv"},
            500,
            "test",
            utils.load_openbookqa,
            {
                "doc_to_text": "question_stem",
                "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                "doc_to_choice": "{{choices.text}}",
            },
        ),
    )
}
