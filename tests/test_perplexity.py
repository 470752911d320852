"""The PPL loop against a deliberately plain re-computation, on the real stories260K and the real texts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import root_file
from experiments.persample import window_values
from pruning.errors import PruningError
from pruning.eval import perplexity as P
from pruning.eval.perplexity import PPLProtocol, perplexity, protocols_from_cfg, token_windows

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"


def plain_ppl(model, stream: list[int], L: int, n_max: int, stride: int | None = None, bos: int | None = None):
    """One window at a time, log_softmax + gather by hand, in float64. Shares no code with pruning.eval.

    stream: the token ids of the whole text. bos=None: windows are stream[k*stride : k*stride+L] (BOS is already
    stream[0]). bos=id: windows are [bos] + stream[k*stride : k*stride+L-1].
    Window 0 scores positions 1..L-1; a later window only its last `stride` positions (HF sliding window).
    """
    body = L if bos is None else L - 1
    stride = stride or body
    total, count, k = 0.0, 0, 0
    per_window = []  # (NLL sum, scored tokens) of each window
    while k < n_max and k * stride + body <= len(stream):
        window = stream[k * stride : k * stride + body]
        if bos is not None:
            window = [bos] + window
        x = torch.tensor([window])
        with torch.no_grad():
            logp = torch.nn.functional.log_softmax(model(x).logits[0].double(), dim=-1)
        first = 1 if k == 0 else max(1, L - stride)
        window_nll = 0.0
        for j in range(first, L):
            window_nll -= logp[j - 1, window[j]].item()
        per_window.append((window_nll, L - first))
        total += window_nll
        count += L - first
        k += 1
    return math.exp(total / count), k, count, per_window


def _check(model, tok, proto, stream, bos=None):
    got = perplexity(model, tok, proto, progress=False)
    want, n, count, per_window = plain_ppl(model, stream, proto.seq_len, proto.max_windows, proto.stride, bos)
    assert (got["n_windows"], got["n_tokens_scored"]) == (n, count)
    assert abs(got["ppl"] / want - 1) <= 1e-4, (got["ppl"], want)
    # the stored per-window values: each window against the plain loop, and together the reported PPL
    nll, tokens = window_values(json.loads(json.dumps(got)))
    assert tokens.tolist() == [c for _, c in per_window]
    assert nll.tolist() == pytest.approx([v for v, _ in per_window], rel=1e-4)
    assert math.exp(nll.sum() / tokens.sum()) == pytest.approx(got["ppl"], rel=1e-12, abs=0)
    assert nll.sum() / tokens.sum() == pytest.approx(got["nll_mean"], rel=1e-12, abs=0)
    return got


@pytest.fixture(scope="module")
def wikitext_streams(tiny, wikitext_rows) -> dict[str, list[int]]:
    """The whole WikiText-2 test text tokenised once for the module (a few seconds each), with the tokenizer's BOS
    and without special tokens."""
    _, tok = tiny
    text = "\n\n".join(wikitext_rows)
    return {"bos": tok(text).input_ids, "plain": tok(text, add_special_tokens=False).input_ids}


@pytest.mark.parametrize("seq_len,n_windows", [(128, 40), (2048, 4)])
def test_wikitext2_matches_plain(tiny, wikitext_streams, seq_len, n_windows):
    model, tok = tiny
    stream = wikitext_streams["bos"]
    assert stream[0] == tok.bos_token_id and stream.count(tok.bos_token_id) == 1
    proto = PPLProtocol("t", "wikitext2", "test", seq_len, batch_size=3, max_windows=n_windows)
    got = _check(model, tok, proto, stream)
    assert got["n_tokens_scored"] == n_windows * (seq_len - 1) and got["n_tokens_text"] == len(stream)
    assert got["seq_len"] == seq_len and got["bos"] == "once" and got["max_windows"] == n_windows


def test_ptb_matches_plain(tiny):
    model, tok = tiny
    lines = root_file("ppl/ptb/ptb.valid.txt").read_text(encoding="utf-8").splitlines()
    stream = tok("\n\n".join(line.strip() for line in lines)).input_ids
    _check(model, tok, PPLProtocol("t", "ptb", "validation", 128, batch_size=8, max_windows=40), stream)


def test_sliding_window_and_every_window_bos_match_plain(tiny, wikitext_streams):
    model, tok = tiny
    got = _check(
        model,
        tok,
        PPLProtocol("t", "wikitext2", "test", 128, stride=48, batch_size=4, max_windows=9),
        wikitext_streams["bos"],
    )
    assert got["n_tokens_scored"] == 127 + 8 * 48
    assert window_values(got)[1].tolist() == [127] + [48] * 8  # windows differ: the counts are stored
    _check(
        model,
        tok,
        PPLProtocol("t", "wikitext2", "test", 64, bos="every_window", batch_size=4, max_windows=9),
        wikitext_streams["plain"],
        bos=tok.bos_token_id,
    )


def test_batch_size_does_not_change_ppl(tiny):
    model, tok = tiny
    a = perplexity(model, tok, PPLProtocol("t", "wikitext2", "test", 128, batch_size=1, max_windows=22), progress=False)
    b = perplexity(model, tok, PPLProtocol("t", "wikitext2", "test", 128, batch_size=7, max_windows=22), progress=False)
    assert abs(a["ppl"] / b["ppl"] - 1) <= 1e-6 and a["n_tokens_scored"] == b["n_tokens_scored"]
    assert window_values(a)[0] == pytest.approx(window_values(b)[0], rel=1e-6)
    assert a["per_window"]["windows"] == b["per_window"]["windows"]  # the same windows: pairable
    c = perplexity(
        model, tok, PPLProtocol("t", "wikitext2", "test", 128, bos="every_window", max_windows=22), progress=False
    )
    assert c["n_windows"] == 22 and c["per_window"]["windows"] != a["per_window"]["windows"]


def test_tokenisation_is_cached(tiny):
    model, tok = tiny
    proto = PPLProtocol("t", "wikitext2", "test", 128, max_windows=2)
    perplexity(model, tok, proto, progress=False)
    n, ids = len(P._TOKEN_CACHE), P._tokenised(tok, proto)
    perplexity(model, tok, PPLProtocol("u", "wikitext2", "test", 2048, max_windows=1), progress=False)
    assert len(P._TOKEN_CACHE) == n and P._tokenised(tok, proto) is ids


def test_model_mode_restored(tiny):
    model, tok = tiny
    model.train()
    try:
        perplexity(model, tok, PPLProtocol("t", "wikitext2", "test", 128, max_windows=1), progress=False)
        assert model.training
    finally:
        model.eval()


def test_token_windows_cover_the_stream_once():
    ids = torch.arange(1000)
    w = token_windows(ids, PPLProtocol("t", "wikitext2", "test", 100))
    assert w.input_ids.shape == (10, 100) and torch.equal(w.input_ids.reshape(-1), ids)
    assert w.score_from.tolist() == [1] * 10 and w.n_scored == 990  # tail dropped, first token never scored
    w = token_windows(ids, PPLProtocol("t", "wikitext2", "test", 100, stride=30))
    scored = [int(row[j]) for row, s in zip(w.input_ids, w.score_from) for j in range(int(s), 100)]
    assert scored == list(range(1, len(scored) + 1))  # sliding: every position after 0 exactly once, in order
    w = token_windows(ids, PPLProtocol("t", "wikitext2", "test", 100, bos="every_window", max_windows=3), 7)
    assert w.input_ids[:, 0].tolist() == [7, 7, 7] and torch.equal(w.input_ids[:, 1:].reshape(-1), ids[:297])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dataset="ptb", split="train"),
        dict(bos="twice"),
        dict(stride=129),
        dict(stride=0),
        dict(batch_size=0),
        dict(max_windows=0),
        dict(seq_len=1),
    ],
)
def test_protocol_validation(kwargs):
    base = dict(name="t", dataset="wikitext2", split="test", seq_len=128)
    with pytest.raises(PruningError):
        PPLProtocol(**{**base, **kwargs})


def test_eval_configs():
    by_file = {f: protocols_from_cfg(OmegaConf.load(CONF / f"{f}.yaml").ppl) for f in ("ppl128", "ppl2048", "quick")}
    for f, protos in by_file.items():
        assert [(p.dataset, p.split) for p in protos] == [("wikitext2", "test"), ("ptb", "validation")], f
        assert all(p.bos == "once" and p.stride == p.seq_len for p in protos)
    assert {p.name for p in by_file["ppl128"]} == {"ppl128-lp"} and {p.seq_len for p in by_file["ppl128"]} == {128}
    assert {p.name for p in by_file["ppl2048"]} == {"ppl2048-sl"} and {p.seq_len for p in by_file["ppl2048"]} == {2048}
    assert [p.max_windows for p in by_file["quick"]] == [50, 50]
    assert [p.max_windows for p in by_file["ppl128"]] == [None, None]
    rec = by_file["ppl128"][0].to_record()
    assert set(rec) == {"name", "dataset", "split", "seq_len", "stride", "bos", "batch_size", "max_windows"}
    with pytest.raises(PruningError, match="seqlen"):
        protocols_from_cfg([{"name": "x", "dataset": "wikitext2", "split": "test", "seqlen": 128}])
