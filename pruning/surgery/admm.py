"""Search-LLM's reformation (METHODS.md §3.9 "Compensation", paper §3.4 / Thm. 3.1): ADMM for the column-pruned
o_proj and down_proj.

Removed heads / MLP channels are input columns of o_proj / down_proj; the kept columns can absorb part of the
lost output. With G = Σ_t x_tᵀx_t (the collector's ``xtx`` of the projection input) the problem is
min_Ŵ tr((Ŵ−W) G (Ŵ−W)ᵀ) s.t. Ŵ[:, pruned] = 0, solved by ADMM from Ŵ⁰ = Z⁰ = W, U⁰ = 0:

    Ŵᵀ ← (G + ρI)⁻¹ (G Wᵀ + ρ (Z − U)ᵀ);   Z ← (Ŵ + U) ⊙ keep;   U ← U + Ŵ − Z;   return Z (exact zeros).

Projection onto the **kept** columns (paper and code print ⊙M with M = pruned, read as a slip; METHODS.md §4).
Preconditioning (the official code's): G is normalised by s = sqrt(diag G), W scaled by s, so ρ means the same at
any activation scale (ρ = 1 as the paper, assumed to be meant for this problem). Rows need no reformation: a
removed row's output is simply absent.
"""

from __future__ import annotations

import torch

from pruning.errors import PruningError

PROJECTIONS = ("kept",)


def admm_reform(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    keep: torch.Tensor,
    rho: float = 1.0,
    iterations: int = 30,
    precondition: bool = True,
    damping: float = 0.0,
    projection: str = "kept",
) -> torch.Tensor:
    """Reformed weight [out, in] (float64) whose pruned columns (``keep`` False) are exactly zero.

    ``keep``: bool [in] or the kept column ids. ``damping`` adds damping·mean(diag G) to G (the code preset's 0.1).
    """
    if projection not in PROJECTIONS:
        raise PruningError(f"admm projection must be one of {PROJECTIONS} (METHODS.md §4), got {projection!r}")
    if not rho > 0 or int(iterations) < 1:
        raise PruningError(f"admm needs rho > 0 and iterations >= 1, got rho={rho}, iterations={iterations}")
    w = weight.detach().to(torch.float64)
    g = xtx.detach().to(device=w.device, dtype=torch.float64)
    n_in = w.shape[1]
    if g.shape != (n_in, n_in):
        raise PruningError(f"admm: Gram matrix {tuple(g.shape)} does not match the weight's {n_in} input columns")
    keep = torch.as_tensor(keep, device=w.device)
    if keep.dtype != torch.bool:
        mask = torch.zeros(n_in, dtype=torch.bool, device=w.device)
        mask[keep.long()] = True
        keep = mask
    keep_f = keep.to(torch.float64)[None, :]
    if bool(keep.all()):
        return w.clone()
    scale = torch.ones(n_in, dtype=torch.float64, device=w.device)
    if precondition:
        d = g.diagonal().sqrt()
        scale = torch.where(d > 0, d, torch.ones_like(d))  # a dead input channel keeps scale 1
        g = g / scale[:, None] / scale[None, :]
        w = w * scale[None, :]  # (W s)(s⁻¹ x) = W x
    if damping:
        g = g + damping * float(g.diagonal().mean()) * torch.eye(n_in, dtype=g.dtype, device=g.device)
    a = g + rho * torch.eye(n_in, dtype=g.dtype, device=g.device)
    chol = torch.linalg.cholesky(a)
    gw = g @ w.T  # [in, out]
    z, u = w.clone(), torch.zeros_like(w)  # Z⁰ = Ŵ⁰ = W, U⁰ = 0
    for _ in range(int(iterations)):
        w_hat = torch.cholesky_solve(gw + rho * (z - u).T, chol).T
        z = (w_hat + u) * keep_f
        u = u + w_hat - z
    return z / scale[None, :]


def output_error(weight: torch.Tensor, reference: torch.Tensor, xtx: torch.Tensor) -> float:
    """‖(Ŵ − W) X‖²_F = tr((Ŵ−W) G (Ŵ−W)ᵀ) from the Gram matrix alone."""
    d = weight.detach().double() - reference.detach().double()
    return float(torch.einsum("oi,ij,oj->", d, xtx.detach().double().to(d.device), d))
