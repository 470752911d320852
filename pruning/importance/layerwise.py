"""Backward one decoder layer at a time, so gradient scoring of a 7B model can fit one 24 GB GPU (``memory.layerwise``).

A whole-model backward keeps every layer's autograd graph (attention and MLP intermediates for all calibration
tokens) until the gradients are done. Here the graph of only one layer exists at a time:

1. one forward without a graph (the model's own forward, so masks, rotary embeddings and per-layer attention
   kwargs are the model's) keeps the residual stream entering each decoder layer and the final norm, and stops
   there (no logits yet);
2. head: logits = lm_head(final_norm(h_L)) with a graph, the scorer's objective, backward -> ∂/∂h_L, in chunks of
   samples whose logits are no larger than one saved hidden state of the whole set (n·T·V·4 bytes would otherwise
   dominate: 0.8 GB for SmolLM2's 49k vocabulary at 32 × 128); the objective is a mean over samples (the scorer's
   contract), so chunk c is weighted by |c|/n;
3. for l = L-1 ... (lowest layer with a scored weight): recompute layer l from its saved input with a graph,
   backward the incoming gradient, pass ∂/∂x_l down; the scored weights' post-accumulate-grad hooks fold each
   gradient into the scorer's accumulators as in the whole-model pass (``GradientScorer``: one home for folding);
4. embeddings (only when scored, e.g. the hidden-channel strategy): the model's forward up to layer 0 with a graph,
   backward ∂/∂x_0.

By the chain rule every weight gets exactly the whole-model gradient (tests: float64, every Taylor variant, equal
to ~1e-15). A weight used in two segments (an lm_head tied to the embedding) must be folded once, from the sum of
both contributions (|w·(g₁+g₂)| ≠ |w·g₁|+|w·g₂|): its ``.grad`` is held (``hold``) until its last segment ran;
so are the head's weights across the head's chunks.

Memory: weights + (L+1)·n·T·d saved hidden states (``offload``: on CPU) + one layer's graph + one head chunk,
instead of weights + L layers' graphs + all logits. ``device``: run on this device (e.g. ``cuda``) a model whose
decoder layers sit elsewhere (e.g. CPU, weights not fitting the GPU): everything outside the decoder layers is put
on ``device`` for the fit, and each layer is moved there only while it runs (forward, then its backward).
The cost is one extra forward per layer (the recompute): 1.0-1.2x the whole-model time in
``benchmarks/bench_layerwise_memory.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from pruning.calibration import _first_arg, _Stop, _to
from pruning.models.adapter import adapter_for
from pruning.utils import input_device, module_device


def _unique(params) -> dict[int, nn.Parameter]:
    return {id(p): p for p in params}


def _needs_grad(params) -> bool:
    return any(p.requires_grad for p in params)


@contextmanager
def _on(module: nn.Module, device: torch.device | None):
    """``module`` on ``device`` while inside (same Parameter objects: ``.to`` swaps ``.data``, hooks stay valid)."""
    home = module_device(module)
    if device is None or home == device:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)


@contextmanager
def placement(model: nn.Module, device: torch.device | None):
    """Everything outside the decoder layers (embeddings, rotary buffers, final norm, lm_head) on ``device`` for
    the duration; decoder layers stay where they are and are moved in one at a time by the walk."""
    if device is None:
        yield
        return
    inside = {id(m) for m in adapter_for(model).layers.modules()}
    moved = []
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device != device:
                moved.append(("p", mod, name, p.device))
                p.data = p.data.to(device)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                moved.append(("b", mod, name, b.device))
                mod._buffers[name] = b.to(device)
    try:
        yield
    finally:
        for kind, mod, name, home in moved:
            tensor = (mod._parameters if kind == "p" else mod._buffers)[name]
            if tensor is None:  # set to None meanwhile: nothing to bring home
                continue
            if kind == "p":
                tensor.data = tensor.data.to(home)
            else:
                mod._buffers[name] = tensor.to(home)


def _grad(t: torch.Tensor) -> torch.Tensor:
    """The gradient ``backward()`` just left on ``t`` (a leaf that requires grad)."""
    if t.grad is None:
        raise RuntimeError("layer-wise backward: the input of a segment received no gradient")
    return t.grad


def _visit(layer: nn.Module, device: torch.device) -> list:
    """Hooks that bring ``layer`` to ``device`` for one forward call and send it home afterwards."""
    home = module_device(layer)

    def arrive(m, args):
        m.to(device)

    def leave(m, args, out):
        m.to(home)

    return [layer.register_forward_pre_hook(arrive), layer.register_forward_hook(leave)]


def execution_device(model: nn.Module, device: torch.device | None) -> torch.device:
    return device if device is not None else input_device(model)


def head_rows(n: int, hidden: int, vocab: int) -> int:
    """Samples per head chunk: logits of a chunk ≤ one saved hidden state of the whole set (n·T·d elements)."""
    return max(1, min(n, (n * hidden) // max(1, vocab)))


def backward_layerwise(
    model: nn.Module,
    ids: torch.Tensor,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hold: set[int],
    offload: bool = False,
    device: torch.device | None = None,
) -> None:
    """d objective(logits(ids), ids) / d w accumulated into ``.grad`` of every parameter that requires grad, one
    decoder layer's graph at a time. ``objective`` must be a mean over the samples of ``ids``. ``hold`` is filled
    with the ids of parameters whose post-accumulate hook must not fold yet and emptied before their last share."""
    adapter = adapter_for(model)
    layers = list(adapter.layers)
    dev = execution_device(model, device)
    store = torch.device("cpu") if offload else dev
    head = _unique(list(adapter.final_norm.parameters()) + list(adapter.lm_head.parameters()))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    embed = {id(p) for p in adapter.embed_tokens.parameters()}
    pre = [
        p
        for pid, p in _unique(model.parameters()).items()
        if pid not in in_layers and (pid not in head or pid in embed)
    ]
    pre_needed = _needs_grad(pre)
    lowest = (
        0 if pre_needed else next((i for i, layer in enumerate(layers) if _needs_grad(layer.parameters())), len(layers))
    )

    # 1. forward without a graph: the residual stream at each needed boundary, and the final norm's input
    saved: dict[int, tuple[torch.Tensor, dict]] = {}
    handles = []

    def keep(i):
        def pre_hook(m, args, kwargs):
            x = _first_arg(args, kwargs, "hidden_states")
            saved[i] = (x.detach().to(store), {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return pre_hook

    def stop(m, args, kwargs):
        saved[len(layers)] = (_first_arg(args, kwargs, "hidden_states").detach().to(store), {})
        raise _Stop

    for i, layer in enumerate(layers):
        if i >= lowest:
            handles.append(layer.register_forward_pre_hook(keep(i), with_kwargs=True))
        if device is not None and module_device(layer) != dev:  # weights elsewhere: in for its forward only
            handles += _visit(layer, dev)
    handles.append(adapter.final_norm.register_forward_pre_hook(stop, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids.to(dev), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()

    # 2. head, in chunks of samples
    h_last = saved.pop(len(layers))[0]
    n = h_last.shape[0]
    rows = head_rows(n, h_last.shape[-1], adapter.lm_head.weight.shape[0])
    shared = {pid for pid, p in head.items() if pid in embed and p.requires_grad} if pre_needed else set()
    head_req = {pid for pid, p in head.items() if p.requires_grad}
    grads = []
    for start in range(0, n, rows):
        hold.clear()
        hold.update(head_req if start + rows < n else shared)
        h = h_last[start : start + rows].to(dev).requires_grad_(True)
        chunk = ids[start : start + rows].to(dev)
        (objective(adapter.lm_head(adapter.final_norm(h)), chunk) * (h.shape[0] / n)).backward()
        grads.append(_grad(h))
    grad = grads[0] if len(grads) == 1 else torch.cat(grads)
    del h_last, grads, h

    # 3. decoder layers, top down
    for i in range(len(layers) - 1, lowest - 1, -1):
        x, kwargs = saved.pop(i)
        x = x.to(dev).requires_grad_(True)
        with _on(layers[i], dev if device is not None else None):
            y = layers[i](x, **_to(kwargs, dev))
            y = y[0] if isinstance(y, tuple) else y
            y.backward(grad)
        grad = _grad(x)
        del x, y  # this layer's graph goes before the next layer's is built

    # 4. embeddings, through the model's own forward up to layer 0
    if pre_needed:
        hold.clear()
        got = {}

        def catch(m, args, kwargs):
            got["x"] = _first_arg(args, kwargs, "hidden_states")
            raise _Stop

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            model(input_ids=ids.to(dev), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        got.pop("x").backward(grad)
    hold.clear()


__all__ = ["backward_layerwise", "execution_device", "placement"]
