"""Search-LLM's OBS saliency (METHODS.md §3.9 "Importance", paper Eq. 1-3): the importance-aware initialisation.

Φ_ij = W_ij² / [(2·XᵀX + λI)⁻¹]_jj per element of a projection, X = that projection's calibration input (the
collector's ``xtx`` at its site), λ = ``damp``·mean(diag(2XᵀX)) (0.01; the paper leaves damping open). A row
channel (q/k/v/gate/up output) scores Σ_j Φ_ij, a column channel (o/down input) Σ_i Φ_ij. A unit sums the channels
of every member: an MLP channel = gate row + up row + down column; a KV group = its g query heads' q rows and o
columns plus its k and v rows (the framework's ``kv_group`` unit, ours). Used only to initialise the search.
"""

from __future__ import annotations

import torch

from pruning.errors import PruningError
from pruning.importance import SCORERS, gather_units
from pruning.importance.activation import ActivationScorer
from pruning.structures import StructureSet

# the collector site whose input each member's weight multiplies
SITE_OF = {
    "q_proj": "q_proj",
    "k_proj": "q_proj",
    "v_proj": "q_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_proj",
    "up_proj": "gate_proj",
    "down_proj": "down_proj",
}


def inverse_hessian_diag(xtx: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """diag((2XᵀX + λI)⁻¹), float64, λ = damp·mean(diag(2XᵀX)) (a zero Gram matrix gets λ = damp)."""
    h = 2.0 * xtx.detach().to(torch.float64)
    lam = damp * float(h.diagonal().mean()) or damp
    h = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()


@SCORERS.register("obs_saliency", "search_llm")
class OBSSaliencyScorer(ActivationScorer):
    requires = dict.fromkeys(("q_proj", "o_proj", "gate_proj", "down_proj"), ("xtx",))

    def __init__(self, damp: float = 0.01):
        super().__init__()
        if not damp > 0:
            raise PruningError(f"obs_saliency damp must be > 0 (it keeps 2XᵀX invertible), got {damp}")
        self.damp = float(damp)

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        if sset.kind not in ("kv_group", "q_head", "mlp"):
            raise PruningError(f"obs_saliency scores heads, KV groups and MLP channels, not {sset.kind!r} units")
        stats = self._layer_stats(sset.decoder_layer)
        total = torch.zeros(sset.n_units, dtype=torch.float64)
        inv = {}
        for m in sset.members:
            site = SITE_OF[m.name]
            if site not in inv:
                inv[site] = inverse_hessian_diag(stats[site].xtx.cpu(), self.damp)
            el = m.weight.detach().to("cpu", torch.float64).pow(2) / inv[site][None, :]
            channel = el.sum(dim=1 - m.dim)  # rows (dim 0): sum over inputs; columns (dim 1): over outputs
            total += gather_units(channel, m)
        return total
