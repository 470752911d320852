"""Gradient saliency with bounded memory: LLM-Pruner's Taylor importance (METHODS.md §3.1), and the engine NIRVANA's
NTK saliency (``pruning.importance.ntk``) reuses with another objective.

Per weight element e with w = weight, g = ∂L/∂w over the whole calibration batch (L = mean token LM cross-entropy,
labels = inputs) and F = (1/N)·Σ_n g_n² from per-sample gradients (the empirical Fisher, official ``acc_grad``):

    element1         Σ_e |w·g|                 (official ``param_first``, the framework default)
    element2         Σ_e |w·g − ½·w²·F|        (``param_mix``; first + second order)
    element2_fisher  Σ_e  w²·F                 (``param_second``)
    vector           |Σ_e w·g|                 (``vectorize``: abs after summing the row or column)

summed per output row (dim 0) or input column (dim 1) of each structure member, reduced over the group's members
channel by channel with ``aggregate`` (LLM-Pruner ``--grouping_strategy``, default sum), then summed over a unit's
channels: the official order (``pruning.importance.group_scores``).

Why an engine instead of ``loss.backward()`` then reading ``.grad``: the official code keeps every gradient (and
the Fisher buffer) of the whole model alive, about 6x the weights for LLaMA-7B. Here only the parameters the
structure sets name get ``requires_grad``; a post-accumulate-grad hook folds each one's gradient into a per-channel
accumulator (a few floats per row/column) and frees ``.grad`` at once, so no two weight-sized gradients coexist.
``element2`` needs F element-wise until g is known: F is held for a chunk of parameters at a time (chunk bytes ≤
``budget``·weight bytes), at the cost of one round of N per-sample passes per chunk. ``micro_batch`` splits the
full-batch pass too (then a chunk's gradients are held across micro-batches), bounding activation memory as well.
``element2_fisher`` folds w²·g_n²/N straight from each per-sample pass and needs no buffer at all.
``layerwise`` runs every one of those backward passes one decoder layer's graph at a time (``pruning.importance.
layerwise``): activation memory of one layer instead of all, the same gradients, the same folding hooks.

Peak memory of the fit is measured and returned (``fit(...)["memory"]``), see ``peak_memory``.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from pruning.calibration import fixed_length
from pruning.errors import PruningError
from pruning.importance import GQA_FOLDS, SCORERS, Scorer, aggregate, group_scores
from pruning.importance.layerwise import backward_layerwise, execution_device, placement
from pruning.runtime import FP16_CPU
from pruning.structures import StructureSet
from pruning.utils import eval_mode, input_device

TAYLOR = ("vector", "element1", "element2", "element2_fisher")
MEMORY_OPTIONS = ("micro_batch", "budget", "layerwise", "offload", "device")  # the ``method.memory`` block
_SLICE_ELEMS = 1 << 22  # fold large weights in row slices so float64 temporaries stay ≤ 32 MB


# ----------------------------------------------------------------------------------------------- memory probe


@contextmanager
def _quiet_fd2():
    """Kineto prints start/stop banners straight to file descriptor 2; hide them around start/stop only."""
    try:
        sys.stderr.flush()
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """Peak bytes of torch tensors allocated *on top of* what was live at entry (weights included at entry).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's CPU allocator reports every allocation and free to the
    profiler (``profile_memory=True``); the running sum of those events in time order gives the exact peak of
    live tensor bytes, which tracemalloc cannot see and RSS blurs with the allocator's caching and the interpreter.
    Yields a dict filled in on exit: ``peak_extra_bytes``, ``method``.
    """
    device = torch.device(device)
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(
            peak_extra_bytes=int(torch.cuda.max_memory_allocated(device) - base),
            method="torch.cuda.max_memory_allocated",
        )
        return
    from torch.profiler import ProfilerActivity, profile

    if torch.autograd.profiler._is_profiler_enabled:  # a second kineto session would break the caller's
        yield out
        out.update(peak_extra_bytes=None, method="not measured: another torch profiler is active")
        return
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.__enter__()
    try:
        yield out
    finally:
        with _quiet_fd2():
            prof.__exit__(None, None, None)
    kineto: Any = prof.profiler  # torch's private profiler session: its results are untyped
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in kineto.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    out.update(peak_extra_bytes=int(peak), method="torch.profiler CPU allocator events (running sum of alloc/free)")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's unique parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------------- engine


def lm_loss_from_logits(model: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's own causal-LM loss (HF ``loss_function``, what ``model(labels=ids).loss`` computes), taken on
    logits so the layer-wise engine can apply it to logits it rebuilt from the last hidden state."""
    lm: Any = model  # a transformers causal LM: its loss_function and config
    return lm.loss_function(logits=logits, labels=ids, vocab_size=lm.config.vocab_size)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of the batch with labels = inputs (LLM-Pruner's calibration loss)."""
    return lm_loss_from_logits(model, model(input_ids=ids, use_cache=False).logits, ids)


def check_memory_options(micro_batch=None, budget=0.25, layerwise=False, offload=False, device=None) -> None:
    """``method.memory`` settings, checked before any pass (the factories call this through the scorer)."""
    if micro_batch is not None and (isinstance(micro_batch, bool) or int(micro_batch) < 1):
        raise PruningError(f"memory.micro_batch must be a positive int or null, got {micro_batch}")
    if not float(budget) > 0:
        raise PruningError(f"memory.budget must be > 0 (a fraction of the weights' bytes), got {budget}")
    for name, v in (("layerwise", layerwise), ("offload", offload)):
        if not isinstance(v, bool):
            raise PruningError(f"memory.{name} must be true or false, got {v!r}")
    if (offload or device is not None) and not layerwise:
        raise PruningError("memory.offload and memory.device apply to layer-wise scoring: set memory.layerwise: true")
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise PruningError(f"memory.device {device!r} is not a torch device: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PruningError(
                f"memory.device={device!r} but CUDA is not available on this machine; use null "
                "(score where the model is)"
            )


class GradientScorer(Scorer):
    """Per-channel gradient saliency, fitted once on a calibration batch and then read per structure set.

    ``fit(model, calib, sets)`` runs the backward passes and returns a meta dict (passes, time, memory); calling
    the scorer on a set afterwards only gathers and aggregates the stored channel vectors. ``objective(model, ids)``
    must be a mean over the items of ``ids`` so micro-batches can be weighted by their size.
    """

    needs_calibration = True
    variant = "element1"

    def __init__(
        self,
        aggregation: str = "sum",
        micro_batch: int | None = None,
        budget: float = 0.25,
        layerwise: bool = False,
        offload: bool = False,
        device: str | None = None,
        gqa_fold: str = "own",
    ):
        aggregate([torch.zeros(1)], aggregation)  # unknown name -> error now
        check_memory_options(micro_batch, budget, layerwise, offload, device)
        if gqa_fold not in GQA_FOLDS:
            raise PruningError(f"unknown gqa_fold {gqa_fold!r}; choices: {', '.join(GQA_FOLDS)}")
        self.aggregation, self.gqa_fold = aggregation, gqa_fold
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        self.budget = float(budget)
        self.layerwise, self.offload = layerwise, offload
        self.device = None if device is None else torch.device(device)
        self._channels: dict[tuple[int, int], torch.Tensor] = {}
        self._hold: set[int] = set()  # layer-wise: ids whose gradient is incomplete (tied, head chunks)
        self._held: dict[int, int] = {}  # their gradient bytes, for the state accounting

    def objective(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """The scalar whose gradient is scored; a mean over the items of ``ids``."""
        return self.logits_objective(model, model(input_ids=ids, use_cache=False).logits, ids)

    def logits_objective(self, model: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The objective as a function of the logits (the layer-wise engine rebuilds them from the last hidden
        state, so both engines score the same function)."""
        return lm_loss_from_logits(model, logits, ids)

    # -- reading ---------------------------------------------------------------------------------------------
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        if sset.kind == "block":
            raise PruningError(f"{type(self).__name__} scores heads, MLP channels and hidden channels, not blocks")
        per_member = []
        for m in sset.members:
            ch = self._channels.get((id(m.weight), m.dim))
            if ch is None:
                raise PruningError(
                    f"{type(self).__name__} was not fitted on {sset.kind} member {m.name}: call "
                    f"fit(model, calib, sets) with the sets to score"
                )
            per_member.append(ch)
        return group_scores(sset, per_member, self.aggregation, self.gqa_fold)

    def channel_scores(self, weight: nn.Parameter, dim: int) -> torch.Tensor:
        """The fitted per-row (dim 0) or per-column (dim 1) score of one weight (per element for 1-D weights)."""
        return self._channels[(id(weight), dim)]

    def reset(self) -> None:
        self._channels = {}

    # -- fitting ---------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, calib: torch.Tensor, sets: list[StructureSet]) -> dict:
        fixed_length(calib, "gradient scoring")
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.shape[0] < 1 or calib.shape[1] < 2:
            raise PruningError(
                "gradient scoring needs calibration token ids [n_samples >= 1, seq_len >= 2]; build "
                "them with pruning.data.calibration_batches"
            )
        dims: dict[int, set[int]] = {}
        params: dict[int, torch.Tensor] = {}
        for s in sets:
            for m in s.members if s.kind != "block" else []:
                params.setdefault(id(m.weight), m.weight)
                dims.setdefault(id(m.weight), set()).add(m.dim)
        if not params:
            raise PruningError(f"{type(self).__name__}: nothing to score (no structure members)")
        device = execution_device(model, self.device) if self.layerwise else input_device(model)
        if any(p.device.type == "meta" for p in params.values()):
            raise PruningError(
                "gradient scoring needs the weights in memory, but some are on the meta device "
                "(accelerate offloading from a device_map with cpu/disk entries); load with a GPU-only "
                "device_map, or load on the CPU and set method.memory.layerwise=true "
                "method.memory.device=cuda"
            )
        if device.type == "cpu" and any(p.dtype == torch.float16 for p in params.values()):
            raise PruningError(FP16_CPU)
        calib = calib.long().to(device)
        n = calib.shape[0]
        flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        for p, _ in flags.values():
            p.requires_grad_(False)
            p.grad = None
        self._channels = {
            (pid, d): torch.zeros(params[pid].shape[d], dtype=torch.float64, device=params[pid].device)
            for pid in params
            for d in sorted(dims[pid])
        }
        plist = list(params.values())
        self._stats = {"passes": 0, "state_peak_bytes": 0}
        self._hold, self._held = set(), {}
        self._acc_bytes = sum(t.numel() * 8 for t in self._channels.values())
        wbytes = weight_bytes(model)
        t0 = time.perf_counter()
        with eval_mode(model):
            try:
                with (
                    placement(model, self.device if self.layerwise else None),
                    peak_memory(device) as mem,
                    torch.enable_grad(),
                ):
                    chunks = self._run(model, calib, n, plist, dims, wbytes)
            finally:
                for p, flag in flags.values():
                    p.grad = None
                    p.requires_grad_(flag)
        if self.variant == "vector":
            for k in self._channels:
                self._channels[k] = self._channels[k].abs()
        peak = mem["peak_extra_bytes"]
        state = int(self._stats["state_peak_bytes"])
        return {
            "scorer": type(self).__name__,
            "variant": self.variant,
            "aggregation": self.aggregation,
            "n_samples": int(n),
            "seq_len": int(calib.shape[1]),
            "backward_passes": self._stats["passes"],
            "chunks": chunks,
            "micro_batch": self.micro_batch,
            "seconds": round(time.perf_counter() - t0, 3),
            "layerwise": self.layerwise,
            "offload": self.offload,
            "device": None if self.device is None else str(self.device),
            "memory": {
                "method": mem["method"],
                "weight_bytes": wbytes,
                "peak_extra_bytes": peak,
                "peak_ratio": None if peak is None else round((wbytes + peak) / wbytes, 4),
                "state_bytes": state,
                "state_ratio": round((wbytes + state) / wbytes, 4),
                "note": (
                    "peak_ratio: all torch tensor bytes at the peak of scoring (weights, activations, "
                    "gradients, buffers) / weight bytes, measured. state_ratio: weights + what the "
                    "scoring design keeps (gradients alive at once, Fisher buffer, accumulators), "
                    "accounted from tensor sizes; activations excluded"
                ),
            },
        }

    def _state(self, nbytes: int) -> None:
        held = sum(self._held.values())
        self._stats["state_peak_bytes"] = max(self._stats["state_peak_bytes"], self._acc_bytes + int(nbytes) + held)

    def _chunks(self, plist: list[torch.Tensor], per_param: int, wbytes: int) -> list[list[torch.Tensor]]:
        """Consecutive parameters whose held buffers (``per_param`` fp32 copies each) fit ``budget``·weight bytes."""
        if per_param == 0:
            return [plist]
        cap = self.budget * wbytes
        chunks: list[list[torch.Tensor]] = []
        cur: list[torch.Tensor] = []
        size = 0
        for p in plist:
            b = p.numel() * 4 * per_param
            if cur and size + b > cap:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += b
        return chunks + ([cur] if cur else [])

    def _per_sample_backward(self, model, calib, n: int) -> None:
        for i in range(n):
            self._backward(model, calib[i : i + 1], 1.0)

    def _backward(self, model, ids, weight: float) -> None:
        def checked(out):
            if not torch.isfinite(out):
                raise PruningError(
                    f"gradient scoring objective is not finite ({out.item()}); check the calibration data"
                )
            return out * weight

        if self.layerwise:
            backward_layerwise(
                model,
                ids,
                lambda logits, chunk: checked(self.logits_objective(model, logits, chunk)),
                self._hold,
                offload=self.offload,
                device=self.device,
            )
        else:
            checked(self.objective(model, ids)).backward()
        self._stats["passes"] += 1

    def _run(self, model, calib, n, plist, dims, wbytes) -> int:
        fisher = self.variant in ("element2", "element2_fisher")
        if self.variant == "element2_fisher":  # Σ w²·g_n²/N is linear in g_n²: fold each sample directly
            return self._pass(model, calib, n, plist, dims, fisher_only=True)
        per_param = int(self.variant == "element2") + int(self.micro_batch is not None)
        chunks = self._chunks(plist, per_param, wbytes)
        for chunk in chunks:
            fbuf = {}
            if fisher:
                fbuf = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in chunk}
                self._fisher_pass(model, calib, n, chunk, fbuf)
            self._pass(model, calib, n, chunk, dims, fbuf=fbuf)
            del fbuf
        return len(chunks)

    def _fisher_pass(self, model, calib, n, chunk, fbuf) -> None:
        fbytes = sum(f.numel() * 4 for f in fbuf.values())

        def hook(p):
            g = p.grad
            self._state(fbytes + g.numel() * g.element_size())
            f, g = fbuf[id(p)], g.float().to(fbuf[id(p)].device)
            f.addcmul_(g, g, value=1.0 / n)
            p.grad = None

        self._with_hooks(chunk, hook, partial(self._per_sample_backward, model, calib, n))

    def _pass(self, model, calib, n, chunk, dims, fbuf=None, fisher_only=False) -> int:
        """One full-batch gradient of the chunk (per-sample passes when ``fisher_only``), folded and freed."""
        fbuf = fbuf or {}
        fbytes = sum(f.numel() * 4 for f in fbuf.values())

        def fold(p):
            g = p.grad
            self._state(fbytes + g.numel() * g.element_size())
            self._fold(p, g, dims[id(p)], fbuf.get(id(p)), 1.0 / n if fisher_only else None)
            p.grad = None

        if fisher_only:
            self._with_hooks(chunk, fold, partial(self._per_sample_backward, model, calib, n))
            return 1
        if self.micro_batch is None:
            self._with_hooks(chunk, fold, lambda: self._backward(model, calib, 1.0))
            return 1
        grads_held = sum(p.numel() * 4 for p in chunk)  # .grad accumulates across micro-batches
        for p in chunk:
            p.requires_grad_(True)
        try:
            for s in range(0, n, self.micro_batch):
                ids = calib[s : s + self.micro_batch]
                self._backward(model, ids, ids.shape[0] / n)
            self._state(fbytes + grads_held)
            for p in chunk:
                self._fold(p, p.grad, dims[id(p)], fbuf.get(id(p)), None)
                p.grad = None
        finally:
            for p in chunk:
                p.requires_grad_(False)
        return 1

    def _with_hooks(self, chunk, hook, body) -> None:
        def gated(p):  # a gradient still missing a segment's share (layer-wise, tied) is not folded yet
            if id(p) in self._hold:
                self._held[id(p)] = p.grad.numel() * p.grad.element_size()
                return
            self._held.pop(id(p), None)
            hook(p)

        for p in chunk:
            p.requires_grad_(True)
        handles = [p.register_post_accumulate_grad_hook(gated) for p in chunk]
        try:
            body()
        finally:
            for h in handles:
                h.remove()
            for p in chunk:
                p.requires_grad_(False)
                p.grad = None

    @torch.no_grad()
    def _fold(self, p, g, dims, f, fisher_weight) -> None:
        """Add this weight's per-channel terms to the accumulators, in row slices of bounded size."""
        if g is None:
            return
        rows = p.shape[0]
        step = max(1, _SLICE_ELEMS // max(1, p[0].numel())) if p.dim() > 1 else rows
        for s in range(0, rows, step):
            w = p.detach()[s : s + step].double()
            gg = g[s : s + step].double().to(w.device)
            if fisher_weight is not None:  # element2_fisher: w²·g_n² / N
                term = (w * gg).square_().mul_(fisher_weight)
            else:
                term = w * gg
                if f is not None:  # element2: w·g − ½·w²·F
                    term.sub_(0.5 * w.square() * f[s : s + step].double().to(w.device))
                if self.variant != "vector":
                    term.abs_()  # vector takes |·| after the whole row/column sum
            for d in dims:
                acc = self._channels[(id(p), d)]
                if p.dim() == 1:
                    acc[s : s + step] += term.to(acc.device)
                elif d == 0:
                    acc[s : s + step] += term.sum(1).to(acc.device)
                else:
                    acc += term.sum(0).to(acc.device)


class TaylorScorer(GradientScorer):
    """LLM-Pruner's Taylor importance; the variant is the class (registered by name in SCORERS)."""


@SCORERS.register("element1")
class Element1(TaylorScorer):
    variant = "element1"


@SCORERS.register("element2")
class Element2(TaylorScorer):
    variant = "element2"


@SCORERS.register("element2_fisher")
class Element2Fisher(TaylorScorer):
    variant = "element2_fisher"


@SCORERS.register("vector")
class Vector(TaylorScorer):
    variant = "vector"


def taylor_scorer(variant: str, **kwargs) -> TaylorScorer:
    cls = SCORERS.get(variant) if variant in TAYLOR else None
    if cls is None or not issubclass(cls, TaylorScorer):
        raise PruningError(f"unknown Taylor importance {variant!r}; choices: {', '.join(TAYLOR)}")
    return cls(**kwargs)


__all__ = [
    "MEMORY_OPTIONS",
    "TAYLOR",
    "GradientScorer",
    "TaylorScorer",
    "check_memory_options",
    "lm_loss",
    "lm_loss_from_logits",
    "peak_memory",
    "taylor_scorer",
    "weight_bytes",
]
