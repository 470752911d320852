"""SliceGPT (Ashkboos et al., ICLR 2024; METHODS.md §3.6): fold the RMSNorm scales into the linears, rotate the
residual stream into the principal basis of calibration activations, layer by layer, and slice its trailing
directions; shortcut matrices Q_lᵀ·Q_{l+1} carry the residual between bases.

Split between the two method calls (the cell's ``prune`` -> ``apply``):
- ``prune`` plans only shapes: the sliced width d′ (from ``pruning.ratio``, or the native ``slicing`` knob) and the
  achieved parameter fraction in closed form, shortcuts included. Its PrunePlan lists the sliced hidden directions
  [d′, d) as kind ``hidden``, *in the rotated (PCA) basis*: it is replayed only through ``SliceGPT.apply``, never
  by ``apply_plan`` (which would cut original channels).
- ``apply`` fuses the norms, computes the rotations on the calibration batches and rotates/slices every weight.
  The model becomes its family's ``Sliced<Family>ForCausalLM`` in place; save it with
  ``pruning.surgery.slicing.save_sliced``.

Rotations, as the official ``rotate_and_slice_sequential``: Q_0 from the embedding output; per layer, Q_mid from the
residual between attention and MLP (the input of ``post_attention_norm``) with the layer's inputs already rotated
and sliced, and Q_out from the layer output with its MLP input already sliced. Both signals come from the one
collector's sequential pass, which runs each layer twice: its statistics pass gives Q_mid; its recompute (after we
rotate the middle) gives the layer output, whose XᵀX we accumulate in a ``ChannelStats`` via a forward hook. While
the pass runs, the inter-layer buffer stays in the original d-dim basis (like the official ``inps``): each layer
enters through x·Q_in[:, :a], and Q_in is known only once the previous recompute is complete, i.e. at the layer's
first call, so its input rotation happens lazily there. Output rotations are applied after the pass.

Differences from the official code, on purpose: no embedding-mean subtraction for RMSNorm models by default
(function-changing defect, METHODS.md §3.6; ``fusion: official`` restores it, and then the official numbers are
reproduced to 4 decimals on stories260K, tests/test_parity.py); ``orientation: pca`` by default (deterministic;
``random`` gives the same function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruning.allocation import Budget, check_ratio
from pruning.calibration import ChannelStats, collect, sequential
from pruning.errors import InfeasibleRatioError, PruningError
from pruning.methods.base import OperatingPoint
from pruning.models.adapter import adapter_for
from pruning.surgery import slicing
from pruning.surgery.plan import PrunePlan

ORIENTATIONS = ("pca", "random")
FUSIONS = ("exact", "official")


def pca(xtx: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of XᵀX + damp·mean(diag)·I, in float64 (official ``pca_calc``)."""
    H = xtx.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    vals, vecs = torch.linalg.eigh(H)
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass
class Dims:
    """Sliced widths: embeddings/layer inputs a_l, MLP inputs m_l, layer outputs o_l (o_L = lm_head input)."""

    attn_in: list[int]
    mlp_in: list[int]
    mlp_out: list[int]

    def removed_directions(self, d: int) -> list[int]:
        return list(range(self.attn_in[0], d))


@dataclass
class SliceGPT:
    name: str = "slicegpt"
    slicing: float | None = None  # native knob: fraction of the hidden dim sliced (paper --sparsity)
    round_interval: int = 8  # d′ is a multiple of this (official --round-interval)
    slice_head: bool = False  # also slice lm_head's input (official do_slice_head, default False)
    orientation: str = "pca"  # pca | random (official run_slicegpt default; same function)
    fusion: str = "exact"  # exact | official (centres the embeddings: not exact for RMSNorm models)
    damp: float = 0.01
    seed: int = 0  # orientation=random only
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.orientation not in ORIENTATIONS:
            raise PruningError(f"slicegpt orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        if self.fusion not in FUSIONS:
            raise PruningError(f"slicegpt fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not isinstance(self.round_interval, int) or self.round_interval < 1:
            raise PruningError(f"slicegpt round_interval must be a positive int, got {self.round_interval!r}")
        if self.slicing is not None and not 0.0 <= float(self.slicing) < 1.0:
            raise PruningError(f"slicegpt slicing must be in [0, 1), got {self.slicing}")

    needs_calibration = True
    variable_length_calibration = True  # statistics only through pruning.calibration
    native_knob = "method.slicing"

    def operating_point(self) -> OperatingPoint | None:
        return (
            None
            if self.slicing is None
            else OperatingPoint(
                "method.slicing",
                float(self.slicing),
                "SliceGPT --sparsity: fraction of the hidden dimension sliced, "
                "d' = floor((1 - s)·d) rounded down to round_interval; MLP widths are kept and shortcuts added",
            )
        )

    # ------------------------------------------------------------------------------------------- planning
    def dims(self, model: nn.Module, width: int) -> Dims:
        L = len(adapter_for(model).layers)
        d = _hidden(model)
        out = [width] * L
        if not self.slice_head:
            out[-1] = d
        return Dims([width] * L, [width] * L, out)

    def params_at(self, model: nn.Module, width: int) -> int:
        adapter = adapter_for(model)
        w = adapter.all_widths()
        dims = self.dims(model, width)
        return slicing.sliced_num_params(
            adapter.embed_tokens.weight.shape[0],
            adapter.head_dim,
            [x.num_heads for x in w],
            [x.num_kv_heads for x in w],
            [x.intermediate_size for x in w],
            dims.attn_in,
            dims.mlp_in,
            dims.mlp_out,
            fixed=slicing.fixed_params(model),
        )

    def width_for(self, model: nn.Module, ratio: float | None) -> int:
        """d′: from ``slicing`` (floor((1−s)·d), rounded down to the interval, as the official code), else the
        grid width whose achieved fraction of all params (shortcuts included) is closest to ``ratio``."""
        d, ri = _hidden(model), self.round_interval
        if self.slicing is not None:
            width = int((1 - float(self.slicing)) * d)
            width -= width % ri
            if width < 1:
                raise InfeasibleRatioError(
                    f"slicegpt slicing={self.slicing} leaves no hidden dimension (d={d}, round_interval={ri})"
                )
            return width
        total = adapter_for(model).num_params()
        grid = list(range(ri, d + 1, ri)) or [d]
        achieved = {w: 1 - self.params_at(model, w) / total for w in grid}
        best = max(achieved.values())
        ratio = check_ratio(ratio)
        if ratio > best + 1e-9:
            raise InfeasibleRatioError(
                f"pruning.ratio={ratio} is beyond slicegpt's reach on this model: the "
                f"narrowest width d′={grid[0]} removes {best:.4f} of all parameters"
            )
        return min(grid, key=lambda w: (abs(achieved[w] - ratio), -w))

    def budget(self, model: nn.Module, ratio: float | None) -> Budget:
        _check_model(model)
        total = adapter_for(model).num_params()
        width = self.width_for(model, ratio)
        return Budget(
            target=ratio,
            total_params=total,
            p=1 - width / _hidden(model),
            removed_params=total - self.params_at(model, width),
        )

    def prune(self, model: nn.Module, ratio: float | None, calib=None) -> PrunePlan:
        budget = self.budget(model, ratio)
        d = _hidden(model)
        width = self.width_for(model, ratio)
        plan = PrunePlan()
        plan.add("hidden", -1, range(width, d))
        plan.meta.update(
            method=self.name,
            target_ratio=ratio,
            planned_ratio=budget.achieved,
            hidden_size=d,
            sliced_hidden_size=width,
            slicing=1 - width / d,
            slice_head=self.slice_head,
            round_interval=self.round_interval,
            orientation=self.orientation,
            damp=self.damp,
            fusion=self.fusion,
            params_closed_form=self.params_at(model, width),
            tied_embeddings="untied" if adapter_for(model).is_tied else "were not tied",
            basis="hidden ids are directions of the PCA basis; replay with SliceGPT.apply only",
        )
        return plan

    # ------------------------------------------------------------------------------------------- rotation
    def apply(self, model: nn.Module, plan: PrunePlan, calib=None) -> nn.Module:
        if plan.meta.get("method") != self.name:
            raise PruningError("SliceGPT.apply needs the plan made by SliceGPT.prune")
        if calib is None:
            raise PruningError("slicegpt needs calibration batches")
        width = int(plan.meta["sliced_hidden_size"])
        dims = self.dims(model, width)
        slicing.fuse_norms(model, center_embeddings=self.fusion == "official")
        bases = rotate_and_slice(
            model, calib, dims, self._orient, damp=self.damp, batch_size=self.batch_size, progress=self.progress
        )
        plan.meta["kept_variance"] = bases["kept_variance"]  # the record shows how much each slice threw away
        return model

    def _orient(self, Q: torch.Tensor, width: int) -> torch.Tensor:
        if self.orientation == "pca" or width < 2:
            return Q
        g = getattr(self, "_gen", None)
        if g is None:
            g = self._gen = torch.Generator().manual_seed(int(self.seed))
        Q = Q.clone()
        Q[:, :width] = Q[:, :width] @ random_orthogonal(width, g)
        return Q


class _Basis:
    """A residual basis Q (float64, d×d): given, or the PCA of an accumulated XᵀX once it is first asked for."""

    def __init__(self, width: int, orient, damp: float, xtx: torch.Tensor | None = None):
        self.width, self._orient, self.damp = width, orient, damp
        self.acc: ChannelStats | None = ChannelStats("block_out", ("xtx",))
        self._Q: torch.Tensor | None = None
        self.kept: float | None = None
        if xtx is not None:
            self._solve(xtx)

    def _solve(self, xtx: torch.Tensor) -> torch.Tensor:
        vals, Q = pca(xtx, self.damp)
        self._Q, self.kept = self._orient(Q, self.width), _kept(vals, self.width)
        return self._Q

    @property
    def Q(self) -> torch.Tensor:
        if self._Q is not None:
            return self._Q
        if self.acc is None:
            raise RuntimeError("slicegpt: a basis without statistics to solve it from")
        Q = self._solve(self.acc.xtx)
        self.acc = None  # solved once: the accumulated XᵀX is no longer needed
        return Q


def rotate_and_slice(
    model: nn.Module,
    calib: torch.Tensor,
    dims: Dims,
    orient=lambda Q, w: Q,
    damp: float = 0.01,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Rotate and slice a norm-fused model (``slicing.fuse_norms``) in place; returns the bases used (float64)."""
    adapter = adapter_for(model)
    layers = list(adapter.layers)
    L = len(layers)
    if not slicing.is_sliced(model) or adapter.config.shortcuts:
        raise PruningError("rotate_and_slice expects a norm-fused, not yet rotated model (slicing.fuse_norms)")
    emb = collect(
        model, calib, {"block_in": ("xtx",)}, layers=[0], mode="dense", batch_size=batch_size, progress=progress
    )
    bases = [_Basis(dims.attn_in[0], orient, damp, emb[0]["block_in"].xtx)]
    bases += [_Basis(dims.mlp_out[l], orient, damp) for l in range(L)]  # bases[l+1]: output of layer l
    mids: list[torch.Tensor] = []
    kept_mid: list[float] = []
    hooks = []

    def entering(l: int):
        layer, width = layers[l], dims.attn_in[l]
        done: list[bool] = []
        inner = layer.forward

        def forward(hidden_states, *args, **kwargs):
            Q = bases[l].Q
            if not done:  # the previous layer's output basis is complete only now
                slicing.rotate_attention_inputs(layer, Q, width)
                slicing.set_shortcut(layer, "attn_shortcut_Q", Q[:, :width].T)
                done.append(True)
            Qs = Q[:, :width].to(hidden_states.device, hidden_states.dtype)
            return inner(hidden_states @ Qs, *args, **kwargs)

        return forward

    own_forward = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's device-map wrapper
    try:
        for l, layer in enumerate(layers):
            layer.forward = entering(l)
        for step in sequential(
            model, calib, stats={"post_attention_norm": ("xtx",)}, batch_size=batch_size, progress=progress
        ):
            l, layer, m = step.layer, layers[step.layer], dims.mlp_in[step.layer]
            vals, Q_mid = pca(step.stats["post_attention_norm"].xtx, damp)
            Q_mid = orient(Q_mid, m)
            mids.append(Q_mid)
            kept_mid.append(_kept(vals, m))
            Q_in = bases[l].Q
            a = dims.attn_in[l]
            slicing.set_shortcut(layer, "attn_shortcut_Q", Q_in[:, :a].T @ Q_mid[:, :m])
            slicing.rotate_attention_output(layer, Q_mid, m)
            slicing.rotate_mlp_inputs(layer, Q_mid, m)
            slicing.set_shortcut(layer, "mlp_shortcut_Q", Q_mid[:, :m].T)  # output stays d-dim until the end
            hooks.append(
                layer.register_forward_hook(
                    lambda mod, args, out, acc=bases[l + 1].acc: acc.update(out[0] if isinstance(out, tuple) else out)
                )
            )
    finally:
        for h in hooks:
            h.remove()
        for layer, fwd in zip(layers, own_forward):
            layer.__dict__.pop("forward", None)
            if fwd is not None:
                layer.forward = fwd
    if len(mids) != L:
        raise PruningError(f"the sequential pass stopped after {len(mids)} of {L} layers")
    for l, layer in enumerate(layers):
        Q_out, o, m = bases[l + 1].Q, dims.mlp_out[l], dims.mlp_in[l]
        slicing.rotate_mlp_output(layer, Q_out, o)
        slicing.set_shortcut(layer, "mlp_shortcut_Q", mids[l][:, :m].T @ Q_out[:, :o])
    slicing.rotate_embeddings(model, bases[0].Q, dims.attn_in[0])
    slicing.rotate_head(model, bases[-1].Q, dims.mlp_out[-1])
    slicing.refresh_config(model)
    return {
        "inputs": [b.Q for b in bases],
        "mids": mids,
        "kept_variance": {"embeddings": bases[0].kept, "mid": kept_mid, "out": [b.kept for b in bases[1:]]},
    }


def _kept(vals: torch.Tensor, width: int) -> float:
    """Fraction of the (damped) calibration energy in the kept directions."""
    return float(vals[:width].sum() / vals.sum())


def _hidden(model: nn.Module) -> int:
    return adapter_for(model).embed_tokens.weight.shape[1]


def _check_model(model: nn.Module) -> None:
    if slicing.is_sliced(model):
        raise PruningError("this model is already SliceGPT-rotated; slice the original model instead")
    slicing.check_sliceable(model)


def slicegpt(
    slicing: float | None = None,
    round_interval: int = 8,
    slice_head: bool = False,
    orientation: str = "pca",
    fusion: str = "exact",
    damp: float = 0.01,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> SliceGPT:
    """Factory for ``conf/method/slicegpt.yaml``. SliceGPT's allocation is its constant sliced width d′
    (ConstSlicingScheduler), chosen from the ratio here."""
    return SliceGPT(
        slicing=slicing,
        round_interval=int(round_interval),
        slice_head=bool(slice_head),
        orientation=orientation,
        fusion=fusion,
        damp=float(damp),
        seed=int(seed),
        batch_size=int(batch_size),
        progress=bool(progress),
    )
