"""Evaluation: perplexity under named protocols (METHODS.md §1.4); every result carries its protocol.

``evaluate`` is the one entry point the cell calls; each block of the eval config (``ppl``, ``zeroshot`` via
lm-eval, ``efficiency``) adds one block to the result.
"""

from __future__ import annotations

from pruning import data
from pruning.eval import perplexity as _ppl  # the module: `pruning.eval.perplexity` must stay importable
from pruning.eval.perplexity import PPLProtocol, protocols_from_cfg

EVAL_VERSION = 1  # bump when a change to the evaluation code changes numbers: cached dense records are then stale


def ppl_label(p: PPLProtocol) -> str:
    """Result key of one protocol; a window-limited run says so, so a subset is never read as the full test."""
    subset = f"[:{p.max_windows} windows]" if p.max_windows else ""
    return f"{p.name}:{p.dataset}:{p.split}{subset}"


def check_eval(eval_cfg) -> None:
    """Validate protocols, find and read their data files before any model is loaded (a missing, corrupt or empty
    file is one line naming it)."""
    for p in protocols_from_cfg(eval_cfg.get("ppl", [])):
        data.ppl_text(p.dataset, p.split)
    if eval_cfg.get("zeroshot") is not None:
        from pruning.eval.zeroshot import check_zeroshot

        check_zeroshot(eval_cfg.get("zeroshot"))
    if eval_cfg.get("efficiency") is not None:
        from pruning.eval.efficiency import EfficiencyConfig

        EfficiencyConfig.from_cfg(eval_cfg.get("efficiency"))


def check_eval_texts(tokenizer, eval_cfg) -> None:
    """Every PPL text fills at least one window of its protocol: needs the tokenizer, so the cell calls it after
    loading and before the dense evaluation (the tokens stay cached for the evaluation itself)."""
    for p in protocols_from_cfg(eval_cfg.get("ppl", [])):
        _ppl.protocol_windows(tokenizer, p)


def evaluate(model, tokenizer, eval_cfg, device=None, progress: bool = True) -> dict:
    out = {}
    protocols = protocols_from_cfg(eval_cfg.get("ppl", []))
    if protocols:
        out["ppl"] = {
            ppl_label(p): _ppl.perplexity(model, tokenizer, p, device=device, progress=progress) for p in protocols
        }
    if eval_cfg.get("zeroshot") is not None:  # lm-eval on the in-memory model (pruning.eval.zeroshot)
        from pruning.eval.zeroshot import zeroshot

        out["zeroshot"] = zeroshot(model, tokenizer, eval_cfg.get("zeroshot"), device=device, progress=progress)
    if eval_cfg.get("efficiency") is not None:
        from pruning.eval.efficiency import efficiency

        out["efficiency"] = efficiency(model, tokenizer, eval_cfg.get("efficiency"), device=device, progress=progress)
    return out
