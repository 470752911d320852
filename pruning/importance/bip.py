"""LLM-BIP block-wise importance — the framework interpretation ``interp_v1`` (METHODS.md §3.8) [ours].

``interp_v1`` is OUR reading of Wu (arXiv 2412.06419), whose exact formula was not available (abstract and summaries
only): a unit's importance is its effect on its own block's output, measured in one gradient-free forward pass of
the dense model over the calibration tokens t.
- MLP channel k: I_k = E_t|a_tk| · ‖W_down[:, k]‖₂, with a the down_proj input. Exact: removing the channel changes
  the block output by −a_tk·W_down[:, k] (down_proj is the last op before the residual add), so I_k = E_t‖ΔY_t‖.
- Attention unit u (query head, or KV group = its g query heads' columns summed before the norm):
  I_u = E_t‖W_O[:, cols(u)]·o_tu‖₂, the direct change of the attention branch. It reaches the block output only
  through the residual and the same block's MLP, so ‖ΔY_t‖ ≤ (1 + Lip(MLP∘RMSNorm))·e_tu (the Lipschitz bound that
  never crosses self-attention); ``propagate: none`` (default) ranks by e_tu itself; ``propagate: mlp_jvp`` takes
  E_t‖δ_tu + J_t·δ_tu‖ with δ_tu = W_O[:, cols(u)]·o_tu and J_t the Jacobian of MLP∘RMSNorm at the token's
  post-attention residual (one forward-mode JVP per unit and batch): the first-order block-output change.
``relative=True`` divides by E_t‖Y_t‖ of the block output, for ranking across layers (``allocation_mode:
global``). Heads are measured by hooks that ride on the calibration collector's own forward pass (``recording``; use a
mode that really runs the model — ``sequential`` — since dense results may be served from a cache);
MLP channels use its ``absmean`` statistic. The scorer never calls ``backward``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from pruning.errors import PruningError
from pruning.importance import SCORERS
from pruning.importance.activation import ATTENTION_KINDS, ActivationScorer, output_member
from pruning.models.adapter import adapter_for
from pruning.structures import StructureSet

VARIANTS = ("interp_v1",)
PROPAGATE = ("none", "mlp_jvp")


class _AttnAcc:
    """Σ_t ‖W_O[:, cols(u)]·o_tu‖ per query head and per KV group, and Σ_t ‖Y_t‖ of the block output."""

    def __init__(self) -> None:
        self.n = 0
        self.q_head: torch.Tensor | None = None
        self.kv_group: torch.Tensor | None = None
        self.out_norm, self.n_out = 0.0, 0

    def head_sums(self, kind: str) -> torch.Tensor:
        """The sums per query head (``q_head``) or per KV group."""
        total = self.q_head if kind == "q_head" else self.kv_group
        if total is None:
            raise PruningError("llm_bip: no head measurements were recorded")
        return total

    @staticmethod
    def deltas(x: torch.Tensor, w_o: torch.Tensor, n_heads: int, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """δ per token and unit: [N, H, d] per query head and [N, H_kv, d] per KV group (its heads summed)."""
        x = x.detach().double().reshape(-1, x.shape[-1])
        w = w_o.detach().double().to(x.device)
        d, hd = w.shape[0], x.shape[1] // n_heads
        per_head = torch.einsum("thk,dhk->thd", x.reshape(-1, n_heads, hd), w.reshape(d, n_heads, hd))
        return per_head, per_head.reshape(-1, n_kv, n_heads // n_kv, d).sum(2)

    def update(self, x: torch.Tensor, w_o: torch.Tensor, n_heads: int, n_kv: int, branch=None) -> None:
        """``branch`` (mlp_jvp): h -> MLP(RMSNorm(h)) and the post-attention residual h; δ becomes δ + J·δ."""
        per_head, per_group = self.deltas(x, w_o, n_heads, n_kv)
        if branch is not None:
            fn, h = branch
            h = h.detach().reshape(-1, h.shape[-1])
            per_head, per_group = (self._propagate(fn, h, t) for t in (per_head, per_group))
        q = per_head.norm(dim=-1).sum(0)
        kv = per_group.norm(dim=-1).sum(0)
        self.q_head = q if self.q_head is None else self.q_head + q
        self.kv_group = kv if self.kv_group is None else self.kv_group + kv
        self.n += per_head.shape[0]

    @staticmethod
    def _propagate(fn, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(delta)
        for u in range(delta.shape[1]):  # forward mode only: the scorer never calls backward
            tangent = delta[:, u].to(h.dtype)
            jd = torch.func.jvp(fn, (h,), (tangent,))[1]
            out[:, u] = delta[:, u] + jd.double()
        return out

    def update_out(self, y: torch.Tensor) -> None:
        y = y.detach().double().reshape(-1, y.shape[-1])
        self.out_norm += y.norm(dim=-1).sum().item()
        self.n_out += y.shape[0]


def _branch(norm, mlp):
    """h -> MLP(RMSNorm(h)) from the modules' weights, bypassing module hooks (the collector's down_proj statistics
    must not see the JVP's dual tensors); SwiGLU as in the LLaMA family."""
    import torch.nn.functional as F

    def fn(z):
        x = norm.forward(z)
        return F.linear(
            mlp.act_fn(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
            mlp.down_proj.weight,
            mlp.down_proj.bias,
        )

    return fn


@SCORERS.register("bip", "llm_bip")
class BIPScorer(ActivationScorer):
    """LLM-BIP ``interp_v1`` (ours, see module doc). Run ``collect(...)`` inside ``recording(model, layers)``."""

    requires = ("absmean",)  # at down_proj

    def __init__(self, variant: str = "interp_v1", propagate: str = "none", relative: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise PruningError(f"unknown llm_bip.variant {variant!r}; choices: {', '.join(VARIANTS)}")
        if propagate not in PROPAGATE:
            raise PruningError(f"unknown llm_bip.propagate {propagate!r}; choices: {', '.join(PROPAGATE)}")
        self.variant, self.propagate, self.relative = variant, propagate, bool(relative)
        self._acc: dict[int, _AttnAcc] = {}

    @contextmanager
    def recording(self, model, layers):
        """Attach the head hooks (o_proj input, block output) for one calibration pass; they never stop it."""
        adapter = adapter_for(model)
        self._acc = {}
        handles = []
        try:
            for i in layers:
                layer = adapter.layers[i]
                acc = self._acc[i] = _AttnAcc()
                o = adapter.o_proj(layer)
                w = adapter.widths(layer)
                seen: dict = {}
                pre: Callable[..., None]
                if self.propagate == "none":

                    def measure(m, args, kwargs, acc=acc, o=o, h=w.num_heads, kv=w.num_kv_heads):
                        acc.update(args[0] if args else kwargs["input"], o.weight, h, kv)

                    pre = measure
                else:  # keep o; measure at the post-attention norm, where the residual h is known

                    def keep_o(m, args, kwargs, seen=seen):
                        seen["o"] = args[0] if args else kwargs["input"]

                    pre = keep_o

                    norm, mlp = adapter.post_attention_norm(layer), adapter.mlp(layer)

                    def at_norm(
                        m, args, kwargs, acc=acc, o=o, h=w.num_heads, kv=w.num_kv_heads, seen=seen, norm=norm, mlp=mlp
                    ):
                        hid = args[0] if args else kwargs["hidden_states"]
                        acc.update(seen.pop("o"), o.weight, h, kv, branch=(_branch(norm, mlp), hid))

                    handles.append(norm.register_forward_pre_hook(at_norm, with_kwargs=True))

                def post(m, args, out, acc=acc):
                    acc.update_out(out[0] if isinstance(out, tuple) else out)

                handles.insert(0, o.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(layer.register_forward_hook(post))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _acc_of(self, layer: int) -> _AttnAcc:
        acc = self._acc.get(layer)
        if acc is None or acc.n == 0:
            raise PruningError(
                f"llm_bip: no head measurements for layer {layer}; run the calibration pass inside "
                "scorer.recording(model, layers)"
            )
        return acc

    def block_output_norm(self, layer: int) -> float:
        acc = self._acc_of(layer)
        return acc.out_norm / max(acc.n_out, 1)

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        member = output_member(sset)
        if sset.kind in ATTENTION_KINDS:
            acc = self._acc_of(sset.decoder_layer)
            score = acc.head_sums(sset.kind).cpu() / acc.n
        else:
            st = self._layer_stats(sset.decoder_layer)["down_proj"]
            score = st.absmean.cpu() * member.weight.detach().to("cpu", torch.float64).norm(dim=0)
        if self.relative:
            score = score / self.block_output_norm(sset.decoder_layer)
        return score
