"""The one calibration-statistics collector (METHODS.md §1.7): forward hooks, streamed over calibration batches.

Every activation-based method asks this module instead of writing its own forward loop: FLAP (mean, variance),
Wanda-SP (squared norms), ShortGPT (block input/output cosine), and later Numerical Pruning / Search-LLM (XᵀX),
LLM-BIP (mean |x|) and SliceGPT (XᵀX of the residual stream).

Sites (where a statistic is taken, per decoder layer; always through the adapter):
  ``q_proj``    input of q/k/v (the attention input after its norm)      ``o_proj``    input of o_proj
  ``gate_proj`` input of gate/up (the MLP input after its norm)          ``down_proj`` input of down_proj
  ``block_in``  the residual stream entering the layer                   ``block_out`` the residual stream leaving it
  ``post_attention_norm``  the residual stream between attention and MLP (the input of that norm; SliceGPT's Q_mid)
Channel statistics (float64 accumulators, merged per chunk with Chan's parallel update so the variance of a
constant channel is 0 up to rounding, not a difference of two large sums):
  ``mean``, ``var`` (unbiased, over all calibration tokens), ``sqnorm`` (Σ_t x_tj², i.e. ‖X_j‖²; ``mean_sq`` =
  sqnorm / N), ``absmean`` (mean |x|), ``xtx`` (Σ_t x_tᵀx_t, D×D).
Block statistic ``block_io``: per-token cosine of the layer's input and output hidden states, accumulated as sums
(ShortGPT's Block Influence = 1 − mean cos); hidden states are never kept.

Modes:
- ``dense``: one streamed pass of the unpruned model per batch; the forward stops after the last requested layer,
  so no logits are materialised. Peak memory: the model, one batch's activations and the statistics.
- ``sequential``: layer by layer (Wanda/SparseGPT style). The inputs of layer 0 are captured once for the whole
  calibration set; each layer is run on them, its statistics are handed to the caller (``sequential()`` yields a
  ``LayerStep``), the caller may prune layer l (edit its weights in place, or ``step.drop(plan)`` to treat the
  plan's units as removed without touching weights), and the layer's outputs, recomputed after that, overwrite the
  buffers as the inputs of layer l+1. Peak memory: one layer's activations for the calibration set (one buffer per
  batch, written in place) plus the statistics. Without intervention it gives the dense statistics.

Calibration input: a token-id tensor [n_samples, seq_len], or a list of 1-D token-id tensors of different lengths
(``calibration.sampler=documents``: whole documents cut into windows, tails kept), batched by equal length. Methods
that need one rectangular batch (gradient scorers) call ``fixed_length`` and refuse a list in one line.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.models.adapter import ModelAdapter, adapter_for
from pruning.utils import eval_mode, input_device, module_device

LINEAR_SITES = ("q_proj", "o_proj", "gate_proj", "down_proj")
SITES = LINEAR_SITES + ("block_in", "block_out", "post_attention_norm")
CHANNEL_STATS = ("mean", "var", "sqnorm", "absmean", "xtx")
BLOCK_STATS = ("block_io",)
MODES = ("dense", "sequential")
LAST_BLOCK_OUTPUT = ("raw", "final_norm")
_CHUNK_ELEMS = 1 << 22  # rows per float64 chunk ≈ 32 MB / D: bounds the upcast copy of a large batch


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (no later layers, no logits)."""


# ----------------------------------------------------------------------------------------------- accumulators


class ChannelStats:
    """Streaming per-channel statistics of one site; accumulators in float64, only what was asked for."""

    def __init__(self, site: str, want: tuple[str, ...]):
        want = tuple(want)
        self.site, self.want = site, want + (("mean",) if "var" in want and "mean" not in want else ())
        self.n = 0
        # float64 accumulators, allocated by the first batch (it fixes the width D): [D] each, xtx [D, D]
        self._mean: torch.Tensor | None = None
        self._xtx: torch.Tensor | None = None
        self._m2: Any = None  # allocated with _mean (Any: mypy does not carry that narrowing over)
        self._sq: Any = None
        self._abs: Any = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        rows = max(1, _CHUNK_ELEMS // x.shape[1])
        for start in range(0, x.shape[0], rows):
            self._update(x[start : start + rows].double())

    def _update(self, x: torch.Tensor) -> None:
        nb, d = x.shape
        if self._mean is None:
            z = lambda: torch.zeros(d, dtype=torch.float64, device=x.device)  # noqa: E731
            self._mean, self._m2, self._sq, self._abs = z(), z(), z(), z()
            if "xtx" in self.want:
                self._xtx = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        if x.shape[1] != self._mean.shape[0]:
            raise PruningError(
                f"site {self.site}: width changed from {self._mean.shape[0]} to {x.shape[1]} during collection"
            )
        n = self.n + nb
        if "mean" in self.want or "var" in self.want:
            mean_b = x.mean(0)
            delta = mean_b - self._mean
            if "var" in self.want:  # Chan et al.: merge (n, mean, M2) with the chunk's own (nb, mean_b, M2_b)
                self._m2 += (x - mean_b).pow(2).sum(0) + delta.pow(2) * (self.n * nb / n)
            self._mean += delta * (nb / n)
        if "sqnorm" in self.want:
            self._sq += x.pow(2).sum(0)
        if "absmean" in self.want:
            self._abs += x.abs().sum(0)
        if self._xtx is not None:
            self._xtx += x.T @ x
        self.n = n

    def _get(self, name: str, value):
        if name not in self.want:
            raise PruningError(
                f"statistic {name!r} was not collected at site {self.site!r} (collected: {', '.join(self.want)})"
            )
        if value is None:
            raise PruningError(f"site {self.site!r} saw no calibration tokens")
        return value

    @property
    def mean(self) -> torch.Tensor:
        return self._get("mean", self._mean)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance over all calibration tokens (0 when only one token was seen)."""
        return self._get("var", self._m2) / max(self.n - 1, 1)

    @property
    def sqnorm(self) -> torch.Tensor:
        """Σ_t x_tj² = ‖X_j‖² over all calibration tokens (Wanda's squared input norm)."""
        return self._get("sqnorm", self._sq)

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sqnorm / self.n

    @property
    def absmean(self) -> torch.Tensor:
        return self._get("absmean", self._abs) / self.n

    @property
    def xtx(self) -> torch.Tensor:
        """Σ_t x_tᵀ x_t (D×D, float64): the Gram matrix behind OBS / Newton / ADMM / PCA."""
        return self._get("xtx", self._xtx)

    def to(self, device) -> ChannelStats:
        for k in ("_mean", "_m2", "_sq", "_abs", "_xtx"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self


class BlockIO:
    """Σ over tokens of cos(h_in, h_out) (NaN → 0.5 as ShortGPT) and of arccos(cos)/π (the angular variant)."""

    def __init__(self):
        self.n = 0
        self.cos_sum = 0.0
        self.angular_sum = 0.0

    def update(self, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        a = h_in.detach().reshape(-1, h_in.shape[-1]).double()
        b = h_out.detach().reshape(-1, h_out.shape[-1]).double().to(a.device)
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).nan_to_num(nan=0.5)
        self.cos_sum += cos.sum().item()
        self.angular_sum += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum().item()
        self.n += cos.numel()

    @property
    def mean_cos(self) -> float:
        if self.n == 0:
            raise PruningError("block_io saw no calibration tokens")
        return self.cos_sum / self.n

    @property
    def bi(self) -> float:
        """ShortGPT Block Influence: 1 − E_t[cos(h_in, h_out)]."""
        return 1.0 - self.mean_cos

    @property
    def angular(self) -> float:
        return self.angular_sum / self.n


@dataclass
class LayerStats:
    layer: int
    sites: dict[str, ChannelStats] = field(default_factory=dict)
    block: BlockIO | None = None

    @property
    def block_io(self) -> BlockIO:
        """The block input/output statistics (``block``), or one line saying they were not collected."""
        if self.block is None:
            raise PruningError(f"layer {self.layer}: block_io was not collected")
        return self.block

    def __getitem__(self, site: str) -> ChannelStats:
        if site not in self.sites:
            raise PruningError(
                f"layer {self.layer}: no statistics at site {site!r} (collected: {', '.join(self.sites) or 'none'})"
            )
        return self.sites[site]


@dataclass
class CalibrationStats(Mapping):
    """Statistics per decoder layer (model numbering at collection time), plus how they were taken."""

    layers: dict[int, LayerStats]
    mode: str
    n_samples: int
    seq_len: int | None  # None: variable-length calibration (windows of different lengths)
    tokens: int | None = None  # total tokens; defaults to n_samples * seq_len

    @property
    def n_tokens(self) -> int:
        if self.tokens is not None:
            return self.tokens
        if self.seq_len is None:
            raise PruningError("variable-length calibration statistics need their token count (tokens)")
        return self.n_samples * self.seq_len

    def __getitem__(self, layer: int) -> LayerStats:
        if layer not in self.layers:
            raise PruningError(f"no calibration statistics for layer {layer} (collected: {sorted(self.layers)})")
        return self.layers[layer]

    def __contains__(self, layer) -> bool:
        return layer in self.layers

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


# ------------------------------------------------------------------------------------------- request parsing


@dataclass
class _Spec:
    sites: dict[str, tuple[str, ...]]  # site -> channel stats
    block_io: bool
    layers: list[int]
    batch_size: int
    last_output: str
    progress: bool


def _parse(
    adapter: ModelAdapter, calib, stats, sites, layers, batch_size, block_last_output, progress
) -> tuple[_Spec, _Calib]:
    """Validate the whole request before any forward pass, so a typo fails in one line."""
    if isinstance(stats, str):
        stats = (stats,)
    if isinstance(stats, Mapping):
        per_site = {s: tuple(v) for s, v in stats.items() if s != "block_io"}
        block_io = bool(stats.get("block_io", False))
    else:
        stats = tuple(stats)
        block_io = "block_io" in stats
        chan = tuple(s for s in stats if s != "block_io")
        per_site = dict.fromkeys(sites or (), chan) if chan else {}
    for site, want in per_site.items():
        if site not in SITES:
            raise PruningError(f"unknown calibration site {site!r}; choices: {', '.join(SITES)}")
        bad = [w for w in want if w not in CHANNEL_STATS]
        if bad or not want:
            raise PruningError(
                f"unknown statistics {bad or want} at site {site!r}; choices: {', '.join(CHANNEL_STATS + BLOCK_STATS)}"
            )
    if not per_site and not block_io:
        raise PruningError("nothing to collect: name channel statistics and sites, or block_io")
    if block_last_output not in LAST_BLOCK_OUTPUT:
        raise PruningError(f"block_last_output must be one of {LAST_BLOCK_OUTPUT}, got {block_last_output!r}")
    n_layers = len(adapter.layers)
    if isinstance(layers, int):
        layers = [layers]
    layers = list(range(n_layers)) if layers is None else sorted({int(i) for i in layers})
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise PruningError(f"calibration layers {layers} must be a non-empty subset of 0..{n_layers - 1}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PruningError(f"calibration batch_size must be a positive int, got {batch_size!r}")
    return _Spec(per_site, block_io, layers, batch_size, block_last_output, progress), _Calib.of(calib, batch_size)


@dataclass
class _Calib:
    """Calibration token ids as forward batches. A tensor [n, L] is cut into consecutive batches exactly as before
    variable lengths existed; a list of 1-D tensors (e.g. ShortGPT's document windows, tails included) is grouped
    by length (first-seen order) and each group cut into batches, so no batch needs padding."""

    batches: list[torch.Tensor]
    n_samples: int
    seq_len: int | None  # None when the lengths differ
    n_tokens: int
    variable: bool

    @classmethod
    def of(cls, calib, batch_size: int) -> _Calib:
        if isinstance(calib, torch.Tensor):
            if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int):
                raise PruningError(
                    f"calibration input must be a token-id tensor [n_samples, seq_len] or a list of "
                    f"1-D token-id tensors, got {type(calib).__name__} {tuple(calib.shape)} "
                    f"{calib.dtype}; build it with pruning.data.draw_calibration"
                )
            if calib.shape[0] < 1 or calib.shape[1] < 1:
                raise PruningError(f"calibration input is empty: shape {tuple(calib.shape)}")
            ids = calib.long()
            return cls(
                [ids[s : s + batch_size] for s in range(0, ids.shape[0], batch_size)],
                int(ids.shape[0]),
                int(ids.shape[1]),
                int(ids.numel()),
                False,
            )
        ok = (
            isinstance(calib, (list, tuple))
            and len(calib) > 0
            and all(
                isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() > 0 and w.dtype in (torch.long, torch.int)
                for w in calib
            )
        )
        if not ok:
            raise PruningError(
                f"calibration input must be a token-id tensor [n_samples, seq_len] or a non-empty "
                f"list of non-empty 1-D token-id tensors, got {type(calib).__name__}; build it with "
                "pruning.data.draw_calibration"
            )
        groups: dict[int, list[torch.Tensor]] = {}
        for w in calib:
            groups.setdefault(w.numel(), []).append(w.long())
        batches = [torch.stack(g[s : s + batch_size]) for g in groups.values() for s in range(0, len(g), batch_size)]
        lengths = set(groups)
        return cls(
            batches, len(calib), lengths.pop() if len(lengths) == 1 else None, sum(w.numel() for w in calib), True
        )

    def sha256(self) -> str:
        """Content hash for the statistics cache (for a tensor: the same digest as before lists were accepted)."""
        h = hashlib.sha256()
        if not self.variable:
            h.update(torch.cat(self.batches).cpu().numpy().tobytes())
            return h.hexdigest()
        for b in self.batches:
            h.update(f"{tuple(b.shape)}".encode())
            h.update(b.cpu().numpy().tobytes())
        return h.hexdigest()


def is_variable_length(calib) -> bool:
    """True for a list of 1-D token tensors (windows of possibly different lengths) rather than one [n, L] tensor."""
    return isinstance(calib, (list, tuple))


def fixed_length(calib, who: str) -> torch.Tensor:
    """The calibration as one [n, L] tensor, or one clear error for methods that need it (gradient scorers: one
    LM loss over a rectangular batch)."""
    if is_variable_length(calib):
        raise PruningError(
            f"{who} needs fixed-length calibration [n_samples, seq_len], but the calibration windows "
            "have different lengths (calibration.sampler=documents); choose another sampler, e.g. "
            "calibration=c4"
        )
    return calib


# ------------------------------------------------------------------------------------------------------ hooks


def _first_arg(args, kwargs, name):
    return args[0] if args else kwargs[name]


def _attach(adapter: ModelAdapter, idx: int, spec: _Spec) -> tuple[LayerStats, list]:
    """Register this layer's statistic hooks; returns its (empty) stats and the hook handles."""
    layer = adapter.layers[idx]
    ls, handles = LayerStats(idx), []
    for site, want in spec.sites.items():
        acc = ls.sites[site] = ChannelStats(site, want)
        if site == "block_out":
            handles.append(
                layer.register_forward_hook(
                    lambda m, a, out, acc=acc: acc.update(out[0] if isinstance(out, tuple) else out)
                )
            )
        else:
            module = layer if site == "block_in" else getattr(adapter, site)(layer)
            name = "hidden_states" if site == "block_in" else "input"
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, kw, acc=acc, name=name: acc.update(_first_arg(a, kw, name)), with_kwargs=True
                )
            )
    if spec.block_io:
        ls.block = BlockIO()
        normed = spec.last_output == "final_norm" and idx == len(adapter.layers) - 1
        norm = adapter.final_norm

        def block_hook(m, args, kwargs, out, acc=ls.block):
            out = out[0] if isinstance(out, tuple) else out
            acc.update(_first_arg(args, kwargs, "hidden_states"), norm(out) if normed else out)

        handles.append(layer.register_forward_hook(block_hook, with_kwargs=True))
    return ls, handles


def _remove(handles) -> None:
    for h in handles:
        h.remove()


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


# ------------------------------------------------------------------------------------------------------ dense


def _collect_dense(model, adapter: ModelAdapter, calib: _Calib, spec: _Spec) -> dict[int, LayerStats]:
    from tqdm.auto import tqdm

    out, handles = {}, []
    try:
        for i in spec.layers:
            out[i], h = _attach(adapter, i, spec)
            handles += h

        def stop(*_):
            raise _Stop

        handles.append(adapter.layers[spec.layers[-1]].register_forward_hook(stop))
        dev = input_device(model)
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(calib.batches, desc="calibration stats (dense)", unit="batch", disable=not spec.progress):
                try:
                    model(input_ids=batch.to(dev), use_cache=False)
                except _Stop:
                    pass
    finally:
        _remove(handles)
    return out


# ------------------------------------------------------------------------------------------------- sequential


@dataclass
class LayerStep:
    """One layer of a sequential pass: its statistics, and how the caller says what it pruned.

    Either edit the layer's weights in place (surgery, compensation) before resuming the generator, or call
    ``drop(plan)``: the plan's units of this layer are treated as removed when its outputs are recomputed (their
    o_proj / down_proj input channels are zeroed, which equals removing the unit: a head reaches the residual
    stream only through its o_proj columns, an MLP channel only through its down_proj column), and a planned
    block is skipped (identity). Weights are untouched, so the plan can be applied to the model afterwards.
    """

    layer: int
    stats: LayerStats
    adapter: ModelAdapter
    drops: dict[str, torch.Tensor] = field(default_factory=dict)
    skip: bool = False
    read_only: bool = False  # sequential(prunes=False): the outputs were computed with the statistics

    def drop(self, plan) -> None:
        from pruning.surgery.compensation import removed_inputs

        if self.layer in plan.blocks:
            self._check_writable()
            self.skip = True
        for site, idx in removed_inputs(self.adapter, plan, self.layer).items():
            self.drop_inputs(site, idx)

    def _check_writable(self) -> None:
        if self.read_only:
            raise PruningError(
                "this sequential pass was opened with prunes=False; open it with prunes=True to prune between layers"
            )

    def drop_inputs(self, site: str, channels) -> None:
        self._check_writable()
        if site not in ("o_proj", "down_proj"):
            raise PruningError(f"only o_proj/down_proj inputs can be dropped, got {site!r}")
        idx = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
        prev = self.drops.get(site)
        self.drops[site] = idx if prev is None else torch.unique(torch.cat([prev, idx]))


def _drop_hooks(adapter: ModelAdapter, step: LayerStep) -> list:
    layer = adapter.layers[step.layer]
    handles = []
    for site, idx in step.drops.items():

        def pre(m, args, kwargs, idx=idx):
            x = _first_arg(args, kwargs, "input").clone()
            x[..., idx.to(x.device)] = 0
            return (x,) + tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "input"}

        handles.append(getattr(adapter, site)(layer).register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def _capture_inputs(model, adapter: ModelAdapter, calib: _Calib, spec: _Spec):
    """Layer 0's inputs for the whole calibration set (one [b, T, d] buffer per batch) and each batch's keyword
    arguments (mask, positions, rotary embeddings), recorded from the model's own forward so nothing is re-derived
    here."""
    from tqdm.auto import tqdm

    bufs: list[torch.Tensor] = []
    kwargs_list: list[dict] = []
    seen: dict = {}

    def catch(m, args, kwargs):
        seen["hidden"] = _first_arg(args, kwargs, "hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = adapter.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    dev = input_device(model)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(calib.batches, desc="calibration inputs", unit="batch", disable=not spec.progress):
                try:
                    model(input_ids=batch.to(dev), use_cache=False)
                except _Stop:
                    pass
                bufs.append(seen.pop("hidden").detach().clone())
                kw = seen.pop("kwargs")
                kwargs_list.append(kwargs_list[-1] if kwargs_list and _same(kw, kwargs_list[-1]) else kw)
    finally:
        handle.remove()
    return bufs, kwargs_list


def _run_layer(layer: nn.Module, bufs: list[torch.Tensor], kwargs_list: list, write: bool) -> None:
    dev = module_device(layer)
    with torch.no_grad():
        for buf, kwargs in zip(bufs, kwargs_list):
            out = layer(buf.to(dev), **_to(kwargs, dev))
            out = out[0] if isinstance(out, tuple) else out
            if write:
                buf.copy_(out)


def _sequential_steps(
    model, adapter: ModelAdapter, calib: _Calib, spec: _Spec, interactive: bool
) -> Iterator[LayerStep]:
    from tqdm.auto import tqdm

    n_layers = len(adapter.layers)
    with eval_mode(model):
        bufs, kwargs_list = _capture_inputs(model, adapter, calib, spec)
        wanted = set(spec.layers)
        bar = tqdm(
            range(spec.layers[-1] + 1), desc="calibration stats (sequential)", unit="layer", disable=not spec.progress
        )
        for i in bar:
            layer = adapter.layers[i]
            if i not in wanted:
                _run_layer(layer, bufs, kwargs_list, write=True)
                continue
            stats, handles = _attach(adapter, i, spec)
            try:  # without a caller that may prune, the stats pass also produces the next layer's inputs
                _run_layer(layer, bufs, kwargs_list, write=not interactive)
            finally:
                _remove(handles)
            step = LayerStep(i, stats, adapter, read_only=not interactive)
            yield step
            if not interactive:
                continue
            if len(adapter.layers) != n_layers or adapter.layers[i] is not layer:
                raise PruningError(
                    "the decoder-layer list changed during a sequential pass; plan block removals "
                    "with step.drop(plan) and apply them after the pass"
                )
            if step.skip:
                continue  # a removed block is the identity on the residual stream
            handles = _drop_hooks(adapter, step)
            try:
                _run_layer(layer, bufs, kwargs_list, write=True)
            finally:
                _remove(handles)
        bar.close()


# -------------------------------------------------------------------------------------------------------- API

_STATS_CACHE: contextvars.ContextVar = contextvars.ContextVar("pruning_stats_cache", default=None)


@contextmanager
def cached_statistics(cache, key: dict):
    """Reuse dense statistics across cells of a sweep: inside this block, ``collect(mode="dense")`` looks them up
    in ``cache`` (an object with ``get_or_compute(key, fn) -> (value, hit)``) under ``key`` plus the request.

    ``key`` must identify the model weights (the cell passes a content fingerprint); the calibration ids are hashed
    into every lookup, so another calibration set (e.g. NIRVANA's candidate seeds) never hits a wrong entry; only
    the dense mode is cached, because sequential statistics depend on the pruning decisions made on the way.
    Only what ``collect`` returns is cached: a caller must not rely on side effects of the forward pass (its own
    hooks would see nothing on a cache hit); such callers use ``sequential``, which is never cached.
    """
    token = _STATS_CACHE.set((cache, dict(key), []))
    try:
        yield _STATS_CACHE.get()[2]  # list of (request, hit) for the record
    finally:
        _STATS_CACHE.reset(token)


def collect(
    model: nn.Module,
    calib: torch.Tensor,
    stats=("mean", "var"),
    sites=("o_proj", "down_proj"),
    layers=None,
    mode: str = "dense",
    batch_size: int = 8,
    progress: bool = True,
    block_last_output: str = "raw",
) -> CalibrationStats:
    """Statistics of ``layers`` over the calibration token ids ``calib``: a tensor [n_samples, seq_len], or a list
    of 1-D tensors of any lengths (batched by equal length; every token counts once, as for a tensor).

    ``stats``: channel statistics applied at every site in ``sites`` (plus ``"block_io"``), or a dict
    ``{site: (stats...), "block_io": True}`` for per-site requests (e.g. ``xtx`` only at ``down_proj``).
    ``block_last_output="final_norm"`` compares the last layer's input with the final-normed output, as ShortGPT's
    code does through HF ``hidden_states``. ``mode="sequential"`` without pruning equals ``dense``; use
    ``sequential()`` to prune between layers.
    """
    if mode not in MODES:
        raise PruningError(f"calibration mode must be one of {MODES}, got {mode!r}")
    adapter = adapter_for(model)
    spec, cal = _parse(adapter, calib, stats, sites, layers, batch_size, block_last_output, progress)

    def result(per_layer) -> CalibrationStats:
        return CalibrationStats(per_layer, mode, cal.n_samples, cal.seq_len, cal.n_tokens)

    active = _STATS_CACHE.get()
    if mode == "dense" and active is not None:
        cache, key, log = active
        request = {
            "stats": stats if not isinstance(stats, Mapping) else dict(stats),
            "sites": list(sites),
            "layers": None if layers is None else list(layers),
            "block_last_output": block_last_output,
            "ids_sha256": cal.sha256(),
        }
        value, hit = cache.get_or_compute(
            {**key, "request": request}, lambda: result(_collect_dense(model, adapter, cal, spec))
        )
        log.append({"request": request, "cached": hit})
        return value
    if mode == "dense":
        return result(_collect_dense(model, adapter, cal, spec))
    return result({step.layer: step.stats for step in _sequential_steps(model, adapter, cal, spec, False)})


def sequential(
    model: nn.Module,
    calib: torch.Tensor,
    stats=("sqnorm",),
    sites=("o_proj", "down_proj"),
    layers=None,
    batch_size: int = 8,
    progress: bool = True,
    block_last_output: str = "raw",
    prunes: bool = True,
) -> Iterator[LayerStep]:
    """Layer-by-layer statistics on inputs produced by the (possibly already pruned) layers below.

    ``for step in sequential(model, calib, ...): ...score step.stats, prune layer step.layer...`` — the request is
    validated here, before the first forward pass. Only one layer's activations for the calibration set are kept.
    ``prunes=False`` streams the dense statistics one layer at a time for a caller that only reads them: each layer
    runs once instead of twice (its outputs are computed with its statistics, so a drop raises and an in-place
    weight edit would not reach the layers below).
    """
    adapter = adapter_for(model)
    spec, cal = _parse(adapter, calib, stats, sites, layers, batch_size, block_last_output, progress)
    return _sequential_steps(model, adapter, cal, spec, prunes)
