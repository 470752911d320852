"""One forward loop for every perplexity protocol (METHODS.md §1.4).

Why one loop: papers differ only in text, window length, stride and BOS placement, so those are protocol data
(``PPLProtocol``) and the scoring code is shared; a number can then only be compared with another number that
carries the same protocol record.

Scoring. The text is tokenised once and cut into full windows of ``seq_len`` tokens (the tail that does not fill a
window is dropped). Within a window, position j is predicted from logits at j-1, so a window can score at most
seq_len-1 tokens and its first token is never scored. With ``stride == seq_len`` (``bos="once"``) this is exactly
LLM-Pruner/SliceGPT/Search-LLM: every window scores its seq_len-1 targets. With a smaller stride, windows overlap
HF-style ("Perplexity of fixed-length models"): the first window scores all its targets and every later window
scores only its last ``stride`` tokens, which are exactly the tokens the previous window did not reach, each with at
least seq_len-stride tokens of context. PPL = exp(total NLL / number of scored tokens), NLL summed in float64.
Windows never share state, so the batch size cannot change the result.

Per window. The row also keeps each window's NLL sum and scored-token count (``per_window``, packed by
``experiments.persample``) so intervals and paired tests can be computed from the record. The reported total is
still accumulated batch by batch as before; the per-window sums add up to it to float64 rounding (~1e-15 rel).

BOS. ``"once"``: the joined text is tokenised with the tokenizer's defaults, so there is one BOS at position 0 of
the stream (window 0 only). ``"every_window"``: the text is tokenised without special tokens and every window is
[BOS] + seq_len-1 text tokens; ``stride`` then counts text tokens and defaults to seq_len-1 (non-overlapping).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F

from experiments.persample import digest, window_block
from pruning.data import PPL_FILES, ppl_source, ppl_text
from pruning.errors import PruningError
from pruning.utils import eval_mode, input_device

BOS_MODES = ("once", "every_window")


@dataclass
class PPLProtocol:
    """Everything that changes a PPL number; ``to_record()`` goes into every result row."""

    name: str
    dataset: str
    split: str
    seq_len: int
    stride: int | None = None  # None -> non-overlapping (seq_len for "once", seq_len-1 for "every_window")
    bos: str = "once"
    batch_size: int = 4
    max_windows: int | None = None  # quick runs: score only the first max_windows windows

    def __post_init__(self) -> None:
        # Fail on config mistakes before any model is loaded.
        if (self.dataset, self.split) not in PPL_FILES:
            choices = ", ".join(f"{d}/{s}" for d, s in PPL_FILES)
            raise PruningError(
                f"PPL protocol {self.name!r}: unknown dataset/split {self.dataset}/{self.split}; choices: {choices}"
            )
        if self.bos not in BOS_MODES:
            raise PruningError(f"PPL protocol {self.name!r}: bos must be one of {BOS_MODES}, got {self.bos!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise PruningError(f"PPL protocol {self.name!r}: seq_len must be an int >= 2, got {self.seq_len!r}")
        if self.stride is None:
            self.stride = self.text_tokens_per_window
        if not (1 <= self.stride <= self.text_tokens_per_window):
            raise PruningError(
                f"PPL protocol {self.name!r}: stride must be in [1, {self.text_tokens_per_window}] "
                f"(a larger stride would skip tokens), got {self.stride}"
            )
        if self.batch_size < 1:
            raise PruningError(f"PPL protocol {self.name!r}: batch_size must be >= 1, got {self.batch_size}")
        if self.max_windows is not None and self.max_windows < 1:
            raise PruningError(f"PPL protocol {self.name!r}: max_windows must be >= 1 or null, got {self.max_windows}")

    @property
    def text_tokens_per_window(self) -> int:
        return self.seq_len - 1 if self.bos == "every_window" else self.seq_len

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def protocols_from_cfg(items: Iterable[Any]) -> list[PPLProtocol]:
    """Build protocols from the ``eval.ppl`` list of a Hydra config (plain dicts or OmegaConf nodes)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(items, (ListConfig, DictConfig)):
            items = cast(Iterable[Any], OmegaConf.to_container(items, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    known = {f.name for f in fields(PPLProtocol)}
    out = []
    for item in items or []:
        item = dict(item)
        unknown = sorted(set(item) - known)
        if unknown:
            raise PruningError(f"unknown PPL protocol keys {unknown}; allowed: {sorted(known)}")
        try:
            out.append(PPLProtocol(**item))
        except TypeError as e:  # missing required key
            raise PruningError(f"bad PPL protocol {item}: {e}") from None
    return out


class Windows(NamedTuple):
    """``input_ids`` [n, seq_len]; window k scores the targets at positions ``score_from[k]`` .. seq_len-1."""

    input_ids: torch.Tensor
    score_from: torch.Tensor

    @property
    def n_scored(self) -> int:
        return int((self.input_ids.shape[1] - self.score_from).sum())


def token_windows(ids: torch.Tensor, protocol: PPLProtocol, bos_token_id: int | None = None) -> Windows:
    """Cut a 1-D token stream into the protocol's windows (tail dropped; ``max_windows`` applied).

    ``ids`` is the tokenisation ``perplexity`` uses: with the tokenizer's defaults for ``bos="once"``, without
    special tokens for ``bos="every_window"`` (then ``bos_token_id`` is required).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    L, cap = protocol.seq_len, protocol.text_tokens_per_window
    stride = protocol.stride or cap  # never None after __post_init__
    n = (ids.numel() - cap) // stride + 1 if ids.numel() >= cap else 0
    if protocol.max_windows is not None:
        n = min(n, protocol.max_windows)
    body = ids.unfold(0, cap, stride)[:n] if n else ids.new_empty((0, cap))
    if protocol.bos == "every_window":
        if bos_token_id is None:
            raise PruningError(f"PPL protocol {protocol.name!r} uses bos=every_window but the tokenizer has no BOS")
        body = torch.cat([body.new_full((n, 1), bos_token_id), body], dim=1)
    # Window 0 scores everything it can (from position 1); later windows only their last `stride` tokens.
    score_from = torch.full((n,), max(1, L - stride), dtype=torch.long)
    if n:
        score_from[0] = 1
    return Windows(body, score_from)


# Tokenised streams keyed by tokenizer identity, text digest and BOS mode, so dense and pruned evaluation in one
# process tokenise once. Bounded: a sweep process sees only a handful of (tokenizer, text) pairs.
_TOKEN_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TOKEN_CACHE_MAX = 8


def clear_token_cache() -> None:
    _TOKEN_CACHE.clear()


def _tokenised(tokenizer, protocol: PPLProtocol) -> torch.Tensor:
    text = ppl_text(protocol.dataset, protocol.split)
    special = protocol.bos == "once"
    key = (
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        getattr(tokenizer, "bos_token_id", None),
        protocol.dataset,
        protocol.split,
        special,
        hashlib.sha1(text.encode("utf-8")).hexdigest(),
    )
    ids = _TOKEN_CACHE.get(key)
    if ids is None:
        ids = torch.tensor(tokenizer(text, add_special_tokens=special).input_ids, dtype=torch.long)
        _TOKEN_CACHE[key] = ids
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_MAX:
            _TOKEN_CACHE.popitem(last=False)
    else:
        _TOKEN_CACHE.move_to_end(key)
    return ids


def protocol_windows(tokenizer, protocol: PPLProtocol) -> tuple[torch.Tensor, Windows]:
    """(token ids, windows) of a protocol's text; a text shorter than one window is one line naming the file.
    The cell calls it once the tokenizer is there, before the dense evaluation (the tokens are then cached)."""
    ids = _tokenised(tokenizer, protocol)
    win = token_windows(ids, protocol, getattr(tokenizer, "bos_token_id", None))
    if win.input_ids.shape[0] == 0:
        raise PruningError(
            f"PPL protocol {protocol.name!r}: {protocol.dataset}/{protocol.split} "
            f"({ppl_source(protocol.dataset, protocol.split)}) has {ids.numel()} tokens, fewer than one window of "
            f"{protocol.seq_len}; restore the file or lower the protocol's seq_len"
        )
    return ids, win


def perplexity(model, tokenizer, protocol: PPLProtocol, device=None, progress: bool = True) -> dict[str, Any]:
    """PPL of ``model`` under ``protocol``; the returned row holds the metrics and every protocol field."""
    ids, win = protocol_windows(tokenizer, protocol)
    n = win.input_ids.shape[0]
    scores = window_scores(
        model,
        win,
        protocol.batch_size,
        device,
        progress,
        desc=f"ppl {protocol.name} {protocol.dataset}/{protocol.split}",
    )
    nll_sum, n_scored = scores.nll_sum, scores.n_scored
    nll_mean = nll_sum / n_scored
    ppl = math.inf if nll_mean > 700 else math.exp(nll_mean)  # nan stays nan; no OverflowError
    return {
        "ppl": ppl,
        "nll_mean": nll_mean,
        "n_windows": n,
        "n_tokens_scored": n_scored,
        "n_tokens_text": int(ids.numel()),
        **protocol.to_record(),
        "per_window": window_block(scores.window_nll, scores.window_tokens, windows_digest(win)),
    }


def windows_digest(win: Windows) -> str:
    """Identity of the scored tokens: equal digests = the same windows, so two PPLs can be compared paired."""
    return digest(
        [
            win.input_ids.to(torch.int64).numpy().astype("<i8").tobytes(),
            win.score_from.to(torch.int64).numpy().astype("<i8").tobytes(),
        ]
    )


class WindowScores(NamedTuple):
    """The total the PPL is computed from (accumulated batch by batch) and the same NLL per window."""

    nll_sum: float
    n_scored: int
    window_nll: list[float]  # float64 NLL sum of each window
    window_tokens: list[int]  # scored tokens of each window


def window_nll(
    model, win: Windows, batch_size: int, device=None, progress: bool = False, desc: str = "ppl"
) -> tuple[float, int]:
    """(summed NLL in float64, scored tokens) of ``win``; search fitness (Search-LLM) needs only the total."""
    scores = window_scores(model, win, batch_size, device, progress, desc)
    return scores.nll_sum, scores.n_scored


def window_scores(
    model, win: Windows, batch_size: int, device=None, progress: bool = False, desc: str = "ppl"
) -> WindowScores:
    """The one scoring loop, shared by every protocol and by search fitness on held-out calibration windows."""
    from tqdm.auto import tqdm

    n = win.input_ids.shape[0]
    device = torch.device(device) if device is not None else input_device(model)
    bs = batch_size
    nll_sum, n_scored = 0.0, 0
    window_nll_sums: list[float] = []
    window_tokens: list[int] = []
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, n, bs), desc=desc, unit="batch", disable=not progress):
            batch = win.input_ids[start : start + bs].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            batch = batch.to(logits.device)  # with device_map the logits live on the last GPU
            # Row by row: upcasting one [L, V] slice keeps memory bounded for large vocabularies.
            starts = win.score_from[start : start + bs].tolist()
            nll = torch.cat(
                [
                    F.cross_entropy(logits[r, s - 1 : -1].float(), batch[r, s:], reduction="none")
                    for r, s in enumerate(starts)
                ]
            )
            nll = nll.to("cpu", torch.float64)  # one host sync per batch
            nll_sum += nll.sum().item()  # the reported total: unchanged summation order
            n_scored += nll.numel()
            lengths = [batch.shape[1] - s for s in starts]
            window_nll_sums += [w.sum().item() for w in nll.split(lengths)]
            window_tokens += lengths
    return WindowScores(nll_sum, n_scored, window_nll_sums, window_tokens)
