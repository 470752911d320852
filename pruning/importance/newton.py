"""Numerical Pruning's Newton score (Shen et al., AAAI 2025; METHODS.md §3.7 "Importance").

A relaxed mask z ∈ [0,1]^D on the input channels of o_proj (D = H·d_h) or down_proj (D = I) is fitted by one Newton
step on f(z) = ½ Σ_i ‖X W_i − X (z∘W_i)‖² + ½ λ (⟨1,z⟩ − r)², r = (1 − ρ)·D (paper notation: W = HF weightᵀ), i.e.
with A = (W Wᵀ) ∘ (XᵀX) (HF: (weightᵀ·weight) ∘ XᵀX):
    g(z) = A (z − 1) + λ (⟨1,z⟩ − r) 1,   H = A + λ 11ᵀ,   z* = 1 − c A⁻¹1,  c = λ(D − r) / (1 + λ 1ᵀA⁻¹1).
f is quadratic, so one step from any z₀ is exact; ``lam=inf`` (default) is the scale-free limit c = (D − r)/1ᵀA⁻¹1
in which every module's z* sums to r. A is damped, A + δ·mean(diag A)·I (``damp``, default 0.01), so dead channels
or N < D do not make it singular [ours, METHODS.md §4]; ``damp=0`` gives the undamped formula.

Unit scores: the mean of z* over a unit's o_proj/down_proj input channels (a KV group: its g·d_h channels) times
α = params(unit) / params(MLP channel) — the paper's α = 4·D_h/3 for an MHA head, 2(g+1)·d_h/3 for a KV group
[ours]. MLP channels get α = 1. Low = prune.
"""

from __future__ import annotations

import math

import torch

from pruning.errors import PruningError
from pruning.importance import SCORERS
from pruning.importance.activation import ATTENTION_KINDS, ActivationScorer, output_member, reduce_units
from pruning.structures import StructureSet


def hadamard_hessian(weight: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """A = (W Wᵀ) ∘ (XᵀX) in float64 for an HF weight [out, in] (so W Wᵀ = weightᵀ weight, [in, in])."""
    w = weight.detach().to("cpu", torch.float64)
    return (w.T @ w) * xtx.detach().to("cpu", torch.float64)


def damped(a: torch.Tensor, damp: float) -> torch.Tensor:
    if damp == 0:
        return a
    mean_diag = a.diagonal().mean()
    scale = mean_diag if mean_diag > 0 else torch.tensor(1.0, dtype=a.dtype)
    return a + damp * scale * torch.eye(a.shape[0], dtype=a.dtype)


def newton_gradient(a: torch.Tensor, z: torch.Tensor, lam: float, r: float) -> torch.Tensor:
    return a @ (z - 1) + lam * (z.sum() - r) * torch.ones_like(z)


def relaxed_mask(
    a: torch.Tensor,
    rho: float,
    lam: float = math.inf,
    iters: int = 1,
    project_box: bool = False,
    z0: torch.Tensor | None = None,
) -> torch.Tensor:
    """z after ``iters`` Newton steps (closed form for λ = ∞; ``project_box`` clips to [0,1] between steps)."""
    d = a.shape[0]
    r = (1.0 - rho) * d
    ones = torch.ones(d, dtype=a.dtype)
    if math.isinf(lam):
        ainv1 = torch.linalg.solve(a, ones)
        z = ones - (d - r) * ainv1 / ainv1.sum()
        return z.clamp(0, 1) if project_box else z
    h = a + lam * torch.outer(ones, ones)
    z = ones.clone() if z0 is None else z0.to(a.dtype).clone()
    for _ in range(max(int(iters), 1)):
        z = z - torch.linalg.solve(h, newton_gradient(a, z, lam, r))
        if project_box:
            z = z.clamp(0, 1)
    return z


def unit_alpha(sset: StructureSet) -> float:
    """params(unit) / params(MLP channel): 4·d_h/3 for an MHA head, 2(g+1)·d_h/3 for a KV group, 1 for MLP."""
    if sset.kind not in ATTENTION_KINDS:
        return 1.0
    d = output_member(sset).weight.shape[0]
    return sset.params_per_unit / (3.0 * d)


@SCORERS.register("newton", "numerical")
class NewtonScorer(ActivationScorer):
    """Numerical Pruning's score from XᵀX at the o_proj/down_proj inputs (bind the collector's statistics).

    ``rho`` is the fraction of each module's channels the relaxed problem aims to prune (its r = (1 − ρ)·D); the
    method sets it from the budget. Within a module the ranking does not depend on ρ or λ, across modules it does.
    """

    requires = ("xtx",)

    def __init__(
        self,
        lam: float | str = "inf",
        damp: float = 0.01,
        alpha: str | float = "paper",
        newton_iters: int = 1,
        project_box: bool = False,
        rho: float = 0.2,
    ):
        super().__init__()
        lam = math.inf if isinstance(lam, str) and lam.lower() in ("inf", "infinity") else lam
        try:
            lam = float(lam)
        except (TypeError, ValueError):
            raise PruningError(f"numerical.lambda must be 'inf' or a positive number, got {lam!r}") from None
        if not lam > 0:
            raise PruningError(f"numerical.lambda must be positive (or inf), got {lam}")
        if not float(damp) >= 0:
            raise PruningError(f"numerical.damp must be >= 0, got {damp}")
        if not (alpha == "paper" or alpha == "none" or isinstance(alpha, (int, float))):
            raise PruningError(f"numerical.alpha must be 'paper', 'none' or a number, got {alpha!r}")
        if int(newton_iters) < 1:
            raise PruningError(f"numerical.newton_iters must be >= 1, got {newton_iters}")
        self.lam, self.damp, self.alpha = lam, float(damp), alpha
        self.newton_iters, self.project_box = int(newton_iters), bool(project_box)
        self.rho = float(rho)
        self._z: dict[tuple[int, str], torch.Tensor] = {}

    def bind(self, stats):
        self._z = {}
        return super().bind(stats)

    def channel_scores(self, sset: StructureSet) -> torch.Tensor:
        """z* over the module's input channels (cached per (layer, site): KV-group and q-head sets share o_proj)."""
        member = output_member(sset)
        key = (sset.decoder_layer, member.name)
        if key not in self._z:
            xtx = self._layer_stats(sset.decoder_layer)[member.name].xtx
            a = damped(hadamard_hessian(member.weight, xtx), self.damp)
            self._z[key] = relaxed_mask(a, self.rho, self.lam, self.newton_iters, self.project_box)
        return self._z[key]

    def alpha_of(self, sset: StructureSet) -> float:
        if self.alpha == "none" or sset.kind not in ATTENTION_KINDS:
            return 1.0
        return unit_alpha(sset) if self.alpha == "paper" else float(self.alpha)

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        z = reduce_units(self.channel_scores(sset), output_member(sset), "mean")
        return z * self.alpha_of(sset)
