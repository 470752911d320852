"""NIRVANA's NTK-informed saliency and the output KL used to choose its calibration seed (METHODS.md §3.2).

S(W_ij) = |W_ij · ∂f/∂W_ij| with f = mean over batch b and vocab v of max over positions t of logits[b, t, v]: the
first-order change of the model *output* (not of a loss) when a weight is zeroed, no labels. Per unit the scores
are L1 sums: an MLP neuron sums its gate row, up row and down column; a KV group sums its q rows (its own g query
heads), k rows, v rows and o_proj columns (official ``Llama/main.py``). This is ``element1`` with sum aggregation
on another objective, so it runs on the same memory-bounded engine (``pruning.importance.taylor``). The official
code scores in bf16; here products are formed in float64 from the model's own dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from pruning.errors import PruningError
from pruning.importance import SCORERS
from pruning.importance.taylor import GradientScorer
from pruning.utils import input_device


def output_objective_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """f = mean_{b,v} max_t logits[b, t, v] (a mean over the batch, so micro-batches weight by size)."""
    return logits.float().max(dim=1).values.mean()


def output_objective(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return output_objective_from_logits(model(input_ids=ids, use_cache=False).logits)


@SCORERS.register("ntk")
class NTKScorer(GradientScorer):
    """|w·∂f/∂w| summed per row/column, summed over a unit's members (NIRVANA's aggregation is a plain sum)."""

    variant = "element1"

    def __init__(
        self,
        micro_batch: int | None = None,
        budget: float = 0.25,
        layerwise: bool = False,
        offload: bool = False,
        device: str | None = None,
    ):
        super().__init__("sum", micro_batch, budget, layerwise, offload, device)

    def logits_objective(self, model: nn.Module, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return output_objective_from_logits(logits)


@torch.no_grad()
def next_token_logprobs(model: nn.Module, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """log softmax of the logits of every position, float32 on the CPU ([n, T, V])."""
    dev = input_device(model)
    out = [
        model(input_ids=ids[s : s + batch_size].to(dev), use_cache=False).logits.float().log_softmax(-1).cpu()
        for s in range(0, ids.shape[0], batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def kl_to_reference(
    model: nn.Module, ids: torch.Tensor, ref_logprobs: torch.Tensor, batch_size: int = 16, eps: float = 1e-12
) -> float:
    """D_KL(P_ref ‖ Q_model) summed over the vocabulary and averaged over tokens (``compute_influence_loss``)."""
    if ref_logprobs.shape[:2] != ids.shape:
        raise PruningError(f"reference log-probs {tuple(ref_logprobs.shape)} do not match ids {tuple(ids.shape)}")
    dev = input_device(model)
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        log_q = model(input_ids=ids[s : s + batch_size].to(dev), use_cache=False).logits.float().log_softmax(-1).cpu()
        log_p = ref_logprobs[s : s + batch_size]
        kl = (log_p.exp().clamp(min=eps) * (log_p - log_q)).sum(-1)
        total += float(kl.double().sum())
        count += kl.numel()
    return total / count
