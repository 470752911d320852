"""Activation-statistics scorers: FLAP's fluctuation, structured Wanda, ShortGPT's Block Influence.

They read statistics from ``pruning.calibration`` (bound with ``scorer.bind(stats)``, a mapping layer ->
LayerStats) and never run the model themselves. ``requires`` names what to collect. Heads and MLP channels are
scored at the input channels of o_proj / down_proj (the member of the structure set named so), then reduced over
each unit's channels: a KV group over the g·d_h channels of its query heads, a query head over its d_h, an MLP
channel is one channel (METHODS.md §1.2 rule 2: q, k and v are never masked with one head mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

import torch

from pruning.errors import PruningError
from pruning.importance import SCORERS, Scorer
from pruning.structures import Member, StructureSet

ATTENTION_KINDS = ("kv_group", "q_head")
REDUCTIONS = ("sum", "mean")
VARIANCES = ("exact", "official_streaming")


class ActivationScorer(Scorer):
    needs_calibration = True
    # statistics pruning.calibration.collect gathers for it: at every site, or per site
    requires: tuple[str, ...] | Mapping[str, tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.stats: Mapping | None = None

    def bind(self, stats: Mapping | None) -> Self:
        """Score from these statistics (``collect``'s, per layer); None releases them."""
        self.stats = stats
        return self

    def _layer_stats(self, layer: int):
        if self.stats is None:
            raise PruningError(f"{type(self).__name__} has no calibration statistics: call bind(collect(...)) first")
        if layer not in self.stats:
            raise PruningError(f"{type(self).__name__}: no calibration statistics for layer {layer}")
        return self.stats[layer]


def output_member(sset: StructureSet) -> Member:
    """The o_proj / down_proj member: its ``index`` lists each unit's input channels of that projection."""
    for m in sset.members:
        if m.name in ("o_proj", "down_proj"):
            return m
    raise PruningError(f"activation scorers score heads and MLP channels, not {sset.kind!r} units")


def reduce_units(channel_scores: torch.Tensor, member: Member, how: str = "sum") -> torch.Tensor:
    """Per-unit scores from per-channel ones (sum, or mean as FLAP's AL-* modes)."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown reduction {how!r}; choices: {', '.join(REDUCTIONS)}")
    per_unit = channel_scores[member.index.to(channel_scores.device)]
    return per_unit.sum(-1) if how == "sum" else per_unit.mean(-1)


def _column_weight(member: Member) -> torch.Tensor:
    return member.weight.detach().to("cpu", torch.float64)


@SCORERS.register("fluctuation", "flap")
class FluctuationScorer(ActivationScorer):
    """FLAP's fluctuation metric at the o_proj / down_proj inputs (lib/prune.py ``metrics``).

    - ``WIFV`` (default): Var(x_j)·‖W[:, j]‖², Var = unbiased sample variance over all calibration tokens;
    - ``IFV``: Var(x_j);  ``WIFN``: mean_i |W_ij|·sqrt(mean_t x_tj²).
    The official code squares the attention metric before use (``square_attention``); units sum their channels
    (FLAP's UL-* head score; its AL-* modes standardise channels first, see ``pruning.allocation.flap``).
    ``bind(stats, fluctuation)`` replaces Var by another estimate per (layer, site), e.g. FLAP's own
    (``streaming_fluctuation``).
    """

    METRICS = ("WIFV", "IFV", "WIFN")
    requires: tuple[str, ...]  # set per metric in __init__

    def __init__(self, metric: str = "WIFV", square_attention: bool = True, reduce: str = "sum"):
        super().__init__()
        if metric not in self.METRICS:
            raise PruningError(f"unknown FLAP metric {metric!r}; choices: {', '.join(self.METRICS)}")
        if reduce not in REDUCTIONS:
            raise PruningError(f"unknown reduction {reduce!r}; choices: {', '.join(REDUCTIONS)}")
        self.metric, self.square_attention, self.reduce = metric, bool(square_attention), reduce
        self.requires = ("sqnorm",) if metric == "WIFN" else ("mean", "var")
        self.fluctuation: Mapping | None = None

    def bind(self, stats: Mapping | None, fluctuation: Mapping | None = None) -> Self:
        self.fluctuation = fluctuation
        return super().bind(stats)

    def _var(self, layer: int, site: str, st) -> torch.Tensor:
        return (self.fluctuation[(layer, site)] if self.fluctuation is not None else st.var).cpu()

    def channel_scores(self, sset: StructureSet) -> torch.Tensor:
        member = output_member(sset)
        st = self._layer_stats(sset.decoder_layer)[member.name]
        w = _column_weight(member)
        if self.metric == "IFV":
            score = self._var(sset.decoder_layer, member.name, st)
        elif self.metric == "WIFV":
            score = self._var(sset.decoder_layer, member.name, st) * w.pow(2).sum(0)
        else:
            score = w.abs().mean(0) * st.mean_sq.cpu().sqrt()
        if self.square_attention and sset.kind in ATTENTION_KINDS:
            score = score.pow(2)
        return score

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        return reduce_units(self.channel_scores(sset), output_member(sset), self.reduce)


def streaming_fluctuation(
    model, calib, layers: list[int], sites=("o_proj", "down_proj"), progress: bool = True
) -> dict[tuple[int, str], torch.Tensor]:
    """FLAP's own variance estimate (``BiasGPT.add_batch``), which its code feeds one calibration sample per step.

    With n samples seen, the running mean m_n of the per-sample means and S_n = Σ_t (x_t − m_n)² over sample n's
    tokens (the code's ``old_baseline_inp`` aliases the updated mean, so both factors use m_n), the estimate is
    f_1 = 0, f_n = f_{n−1}·(n−2)/(n−1) + S_n/n: the first sample enters the mean only, and the result is about
    T (tokens per sample) times the variance. S_n comes from each sample's Σx and Σx² (the collector, one sample
    at a time, in float64). METHODS.md §3.3 "Estimator"."""
    from tqdm.auto import tqdm

    from pruning.calibration import collect, is_variable_length

    samples = [w[None] for w in calib] if is_variable_length(calib) else [calib[n : n + 1] for n in range(len(calib))]
    out: dict[tuple[int, str], torch.Tensor] = {}
    mean: dict[tuple[int, str], torch.Tensor] = {}
    for n, sample in enumerate(tqdm(samples, desc="FLAP streaming variance", unit="sample", disable=not progress)):
        stats = collect(
            model, sample, stats=("mean", "sqnorm"), sites=sites, layers=layers, mode="sequential", progress=False
        )
        for i in layers:
            for site in sites:
                st, key = stats[i][site], (i, site)
                t = st.n
                m = mean[key] = st.mean if n == 0 else mean[key] * (n / (n + 1)) + st.mean / (n + 1)
                s_n = st.sqnorm - 2 * m * t * st.mean + t * m.pow(2)
                out[key] = torch.zeros_like(m) if n == 0 else out[key] * ((n - 1) / n) + s_n / (n + 1)
    return out


@SCORERS.register("wanda")
class WandaScorer(ActivationScorer):
    """Structured Wanda as FLAP's ``prune_wanda_sp``: s_j = mean_i |W_ij|·sqrt(q_j), q_j = mean_t x_tj².

    The official q_j is the average over samples of the per-sample Σ_t x²: a constant factor (tokens per sample)
    away, so the ranking is the same (METHODS.md §3.4). A head (or KV group) sums its channels.
    """

    requires = ("sqnorm",)

    def channel_scores(self, sset: StructureSet) -> torch.Tensor:
        member = output_member(sset)
        st = self._layer_stats(sset.decoder_layer)[member.name]
        return _column_weight(member).abs().mean(0) * st.mean_sq.cpu().sqrt()

    @torch.no_grad()
    def __call__(self, sset: StructureSet) -> torch.Tensor:
        return reduce_units(self.channel_scores(sset), output_member(sset), "sum")


@SCORERS.register("block_influence", "bi")
class BlockInfluenceScorer(ActivationScorer):
    """ShortGPT's Block Influence, 1 − E_t cos(h_in, h_out), per candidate block (``angular``: E_t arccos/π)."""

    requires = ("block_io",)

    def __init__(self, angular: bool = False):
        super().__init__()
        self.angular = bool(angular)

    def __call__(self, sset: StructureSet) -> torch.Tensor:
        if sset.kind != "block":
            raise PruningError(f"block_influence scores decoder blocks, not {sset.kind!r} units")
        vals = []
        for layer in sset.unit_layers:
            io = self._layer_stats(layer).block_io
            vals.append(io.angular if self.angular else io.bi)
        return torch.tensor(vals, dtype=torch.float64)
