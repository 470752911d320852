"""The official calibration samplers (pruning.data.SAMPLERS) on the real data and the real stories260K tokenizer.

- Each deterministic mode (order=file) reproduces the calibration rule stated by a run of the parity fixture
  (tests/fixtures/parity/stories260k_official.json), token for token.
- Each random mode draws the same ids as an independent copy of the official code's draw loop for a given seed.
- Bad fields, unknown samplers and shapes the data cannot fill fail in one line before any model work.
- Variable-length calibration (ShortGPT's document windows, tails kept) goes through the statistics collector; ShortGPT
  on it reproduces the official Block Influence sums, removed block and PPL of the fixture.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES, root_file, site_inputs
from pruning import data
from pruning.calibration import collect, fixed_length, sequential
from pruning.errors import InfeasibleCalibrationError, PruningError

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "parity" / "stories260k_official.json"
RUNS = {r["run"]: r for r in json.loads(FIXTURE.read_text())["runs"]}
C4 = "calib/c4/c4_validation_2k.parquet"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.ASSETS / "stories260K")


@pytest.fixture(scope="module")
def c4() -> list[str]:
    """The data root's 2,000 C4 validation documents in file order, read here without pruning.data."""
    import pyarrow.parquet as pq

    return pq.read_table(root_file(C4), columns=["text"]).column("text").to_pylist()


@pytest.fixture
def embedded(monkeypatch, tmp_path) -> list[str]:
    """The embedded 256-document C4 slice (fast to tokenise); the same first 256 documents as the data root's."""
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))
    assert data.calibration_source("c4").name == "c4_validation_256.jsonl.gz"
    return data.calibration_texts("c4")


def draw(tok, **fields):
    return data.draw_calibration(tok, {"dataset": "c4", "seed": 0, "order": "random", **fields}, progress=False)


def ids(tok, text: str) -> list[int]:
    return tok(text).input_ids


# ------------------------------------------------------------------------------- the fixture's calibration rules


def test_llm_pruner_runs_first_64_tokens_of_documents_0_to_9(tok, c4):
    rules = {r["calibration"] for name, r in RUNS.items() if name.startswith("llm_pruner")}
    assert rules == {
        (
            "10 samples x 64 tokens: sample k = the first 64 tokens (tokenizer defaults, so BOS included) "
            "of C4 document k, file order (documents 0-9)"
        )
    }
    want = torch.tensor([ids(tok, c4[k])[:64] for k in range(10)])
    assert torch.equal(draw(tok, sampler="first_docs", n_samples=10, seq_len=64, order="file"), want)
    # LLM-Pruner's sampler in file order: documents 0-9 all have >= 64 tokens, so the same tokens
    assert torch.equal(draw(tok, sampler="llm_pruner", n_samples=10, seq_len=64, order="file"), want)
    assert (want[:, 0] == tok.bos_token_id).all()


def test_flap_run_consecutive_windows_of_the_space_joined_stream(tok, embedded):
    rule = RUNS["flap_wifv_al_am_0.2"]["calibration"]
    assert rule == (
        "1024 consecutive non-overlapping 128-token windows from the start of one stream: "
        "' '.join(first 100 C4 documents), tokenised once (138,496 tokens)"
    )
    stream = ids(tok, " ".join(embedded[:100]))
    assert len(stream) == 138_496  # the fixture's count: same text, same tokenizer
    want = torch.tensor(stream[: 1024 * 128]).reshape(1024, 128)
    got = draw(tok, sampler="stream", join=" ", n_samples=1024, seq_len=128, order="file")
    assert torch.equal(got, want)


def test_wanda_sp_run_kth_document_with_more_than_128_tokens(tok, c4):
    rule = RUNS["wanda_sp_0.2"]["calibration"]
    assert rule == (
        "sample k = the first 128 tokens of the k-th C4 document (file order) with more than 128 tokens; 128 samples"
    )
    long_docs = [d for d in (ids(tok, t) for t in c4[:400]) if len(d) > 128]
    want = torch.tensor([d[:128] for d in long_docs[:128]])
    assert torch.equal(draw(tok, sampler="wanda", n_samples=128, seq_len=128, order="file"), want)
    # strict: a document of exactly 128 tokens qualifies for LLM-Pruner's sampler (>=) but not for Wanda-SP's (>)
    exact = [i for i, t in enumerate(c4[:400]) if len(ids(tok, t)) == 128]
    if exact:
        lp = draw(tok, sampler="llm_pruner", n_samples=128, seq_len=128, order="file")
        assert not torch.equal(lp, want)


def official_slicegpt(tok, texts, n, L, seed, random_start=True):
    """TransformerCompression src/slicegpt/data_utils.py prepare_dataloader (varied_seqlen=False), copied; the final
    tokenisation per sample (the official batch pads to the longest; all samples here are full length)."""
    data_list = [t for t in texts if len(t) > 0]
    new_data_list = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        indices = list(range(len(data_list)))
        while len(new_data_list) < n and len(indices) > 0:
            start_idx = torch.randint(0, len(indices), (1,)).item() if random_start else 0
            idx = start_idx
            tokens = []
            while len(tokens) < L and idx < len(indices):
                item = data_list[indices[idx]]
                sep = "" if not tokens else "\n\n"
                tokens += tok.tokenize(sep + item)
                idx += 1
            indices = indices[:start_idx] + indices[idx:]
            if len(tokens) >= L:
                tokens = tokens[:L]
                new_data_list.append(tok.convert_tokens_to_string(tokens))
    return torch.tensor([tok(s, max_length=L, truncation=True).input_ids for s in new_data_list])


def test_slicegpt_runs_consecutive_documents_from_the_start(tok, c4):
    for name in ("slicegpt_0.2_round8", "slicegpt_0.2_round1", "slicegpt_0.0"):
        assert RUNS[name]["calibration"] == (
            "128 samples x 128 tokens: each sample concatenates consecutive C4 documents from the start of the file, "
            "joined with '\\n\\n', until >= 128 tokens, then truncated (the official random start document replaced "
            "by the first unused one)"
        )
    got = draw(tok, sampler="slicegpt", n_samples=128, seq_len=128, order="file")
    assert torch.equal(got, official_slicegpt(tok, c4, 128, 128, 0, random_start=False))
    assert got.shape == (128, 128) and (got[:, 0] == tok.bos_token_id).all()  # one BOS per sample
    # independent of the official code: sample 0 is the start of "\n\n".join(documents 0, 1, ...)
    head = tok("\n\n".join(c4[:3]), add_special_tokens=False).input_ids
    assert got[0, 1:40].tolist() == head[:39]


def official_shortgpt_windows(tok, texts, stride):
    """shortgpt.py eval_importance with batch 1: the whole document tokenised, inputs[start:start + stride]."""
    out = []
    for t in texts:
        input_ids = tok([t], padding=False, return_tensors="pt").input_ids
        for start in range(0, input_ids.shape[1], stride):
            out.append(input_ids[0, start : start + stride])
    return out


def test_shortgpt_run_every_document_in_windows_with_tails(tok, c4):
    rule = RUNS["shortgpt_remove1"]["calibration"]
    assert rule == (
        "all 2,000 C4 documents in file order, each tokenised whole and cut into consecutive 128-token "
        "windows (a shorter tail window kept), batch 1; BI summed over all tokens"
    )
    got = draw(tok, sampler="documents", n_samples=None, seq_len=128, order="file")
    want = official_shortgpt_windows(tok, c4, 128)
    assert len(c4) == 2000 and len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    lengths = {len(w) for w in got}
    assert 128 in lengths and len(lengths) > 50  # tails of many lengths are kept
    first = draw(tok, sampler="documents", n_samples=3, seq_len=128, order="file")
    assert all(torch.equal(a, b) for a, b in zip(first, official_shortgpt_windows(tok, c4[:3], 128)))


# ------------------------------------------------------------------ random modes against the official draw loops


def _with_global_random(seed, fn):
    state = random.getstate()
    try:
        random.seed(seed)
        return fn()
    finally:
        random.setstate(state)


def official_nirvana(tok, texts, n, L, seed):
    """NIRVANA Llama/dataset/utils.py get_bookcorpus (idx < 0 path), copied."""

    def loop():
        traindata = [t for t in texts if len(t) > L]  # traindata.filter(lambda x: len(x["text"]) > seq_len)
        tokenized_samples, history = [], []
        for _ in range(n):
            while True:
                i = random.randint(0, len(traindata) - 1)
                tokenized_sample = tok(traindata[i], return_tensors="pt")
                if tokenized_sample.input_ids.shape[1] >= L and i not in history:
                    history.append(i)
                    break
            i = random.randint(0, tokenized_sample.input_ids.shape[1] - L)
            tokenized_samples.append(tokenized_sample.input_ids[:, i : i + L])
        return torch.cat(tokenized_samples, dim=0)

    return _with_global_random(seed, loop)


def official_wanda_c4(tok, texts, n, L, seed):
    """FLAP lib/data.py get_c4 (the trainloader part), copied."""

    def loop():
        trainloader = []
        for _ in range(n):
            while True:
                i = random.randint(0, len(texts) - 1)
                trainenc = tok(texts[i], return_tensors="pt")
                if trainenc.input_ids.shape[1] > L:
                    break
            i = random.randint(0, trainenc.input_ids.shape[1] - L - 1)
            trainloader.append(trainenc.input_ids[:, i : i + L])
        return torch.cat(trainloader, dim=0)

    return _with_global_random(seed, loop)


def official_stream(tok, texts, n, L, seed, join):
    """FLAP lib/data.py get_wikitext2 (join " ") / search-llm lib_utils/data_utils.py get_wikitext2 (join "\\n\\n")."""

    def loop():
        trainenc = tok(join.join(texts), return_tensors="pt")
        trainloader = []
        for _ in range(n):
            i = random.randint(0, trainenc.input_ids.shape[1] - L - 1)
            trainloader.append(trainenc.input_ids[:, i : i + L])
        return torch.cat(trainloader, dim=0)

    return _with_global_random(seed, loop)


def test_nirvana_random_draw_equals_official(tok, embedded):
    for n, L, seed in ((32, 128, 12), (8, 64, 5)):
        got = draw(tok, sampler="nirvana", n_samples=n, seq_len=L, seed=seed)
        assert torch.equal(got, official_nirvana(tok, embedded, n, L, seed))
    # the character pre-filter changes the draw: the same seed over all documents (LLM-Pruner) differs
    assert not torch.equal(
        draw(tok, sampler="nirvana", n_samples=32, seq_len=128, seed=12),
        draw(tok, sampler="llm_pruner", n_samples=32, seq_len=128, seed=12),
    )


def test_wanda_random_draw_equals_official_and_allows_repeats(tok, embedded):
    got = draw(tok, sampler="wanda", n_samples=128, seq_len=128, seed=0)
    assert torch.equal(got, official_wanda_c4(tok, embedded, 128, 128, 0))
    # more samples than long documents: Wanda-SP's sampler repeats documents, LLM-Pruner's refuses
    n_long = sum(len(ids(tok, t)) >= 4096 for t in embedded)
    assert 0 < n_long < 20
    many = draw(tok, sampler="wanda", n_samples=n_long + 3, seq_len=4096, seed=3)
    assert torch.equal(many, official_wanda_c4(tok, embedded, n_long + 3, 4096, 3))
    with pytest.raises(InfeasibleCalibrationError):
        draw(tok, sampler="llm_pruner", n_samples=n_long + 3, seq_len=4096, seed=3)


@pytest.mark.parametrize("join,n,L,seed", [(" ", 1024, 128, 0), ("\n\n", 16, 2048, 123)])
def test_stream_random_draw_equals_official(tok, embedded, join, n, L, seed):
    got = draw(tok, sampler="stream", join=join, n_samples=n, seq_len=L, seed=seed)
    assert torch.equal(got, official_stream(tok, embedded, n, L, seed, join))


def test_slicegpt_random_draw_equals_official(tok, embedded):
    for n, L, seed in ((16, 128, 42), (4, 2048, 7)):
        got = draw(tok, sampler="slicegpt", n_samples=n, seq_len=L, seed=seed)
        assert torch.equal(got, official_slicegpt(tok, embedded, n, L, seed))
    # the generator is private: the global torch RNG is neither read nor advanced
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    draw(tok, sampler="slicegpt", n_samples=4, seq_len=128, seed=1)
    assert torch.equal(torch.rand(1), before)


def test_documents_random_takes_a_seeded_subset(tok, embedded):
    got = draw(tok, sampler="documents", n_samples=5, seq_len=64, seed=9)
    chosen = torch.randperm(len(embedded), generator=torch.Generator().manual_seed(9))[:5].tolist()
    want = [w for i in chosen for w in torch.tensor(ids(tok, embedded[i])).split(64)]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    # every document: the same windows as file order, only in another order
    everything = draw(tok, sampler="documents", n_samples=None, seq_len=64, seed=9)
    in_file = draw(tok, sampler="documents", n_samples=None, seq_len=64, order="file")
    assert sorted(map(tuple, map(torch.Tensor.tolist, everything))) == sorted(
        map(tuple, map(torch.Tensor.tolist, in_file))
    )


# sha256 of the token ids the llm_pruner sampler drew on the data root's C4 (stories260K tokenizer) before samplers
# were selectable (commit 18b4a80): every existing record's calibration, so the draw sequence must not move.
LLM_PRUNER_DRAWS = {
    (10, 64, 42): "9d56684c9c0c5bd060c6e4409b328e6f66e111f9f6dc6d5e3809710632ab3c9e",
    (128, 128, 0): "5cd5e6fb174960de88531cc8ce2fb1170da5e7d6d4943472ddc6fff5e78f3d4e",
    (32, 128, 12): "2902814b525ac8bae2677e1b547eb60ebfe0550da12f40dc6d7d74aabd1d6dce",
}


def test_llm_pruner_sampler_keeps_its_draw_sequence(tok, c4):
    import hashlib

    for (n, L, seed), digest in LLM_PRUNER_DRAWS.items():
        got = draw(tok, sampler="llm_pruner", n_samples=n, seq_len=L, seed=seed)
        assert hashlib.sha256(got.numpy().tobytes()).hexdigest() == digest
        assert torch.equal(got, data.calibration_batches(tok, "c4", n, L, seed, progress=False))


# ------------------------------------------------------------------------------------------- bad input, one line


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"sampler": "bookcorpus"}, r"unknown calibration.sampler 'bookcorpus'; choices: llm_pruner, nirvana, stream"),
        ({"sampler": "stream"}, "needs calibration.join"),
        ({"sampler": "wanda", "join": " "}, "join is only used by sampler=stream"),
        ({"order": "sorted"}, "order must be one of random, file"),
        ({"sampler": "first_docs"}, "first_docs is deterministic"),
        ({"n_samples": None}, "n_samples must be an int >= 1"),
        ({"seq_len": 1}, "seq_len must be an int >= 2"),
        ({"seed": "zero"}, "seed must be an int"),
        ({"windows": 4}, r"unknown calibration keys \['windows'\]"),
        ({"dataset": "wikitext2"}, "evaluated text"),
        ({"dataset": "pile"}, "unknown calibration dataset"),
    ],
)
def test_bad_fields_fail_at_config_time(fields, match):
    cfg = {
        "sampler": "llm_pruner",
        "dataset": "c4",
        "n_samples": 8,
        "seq_len": 64,
        "seed": 0,
        "order": "random",
        "join": None,
        "paper_dataset": None,
        **fields,
    }
    with pytest.raises(PruningError, match=match):
        data.calibration_spec(cfg)


def test_old_configs_mean_llm_pruner():
    spec = data.calibration_spec({"dataset": "c4", "n_samples": 8, "seq_len": 64, "seed": 0})
    assert (spec.sampler, spec.order, spec.join) == ("llm_pruner", "random", None)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"sampler": "llm_pruner", "n_samples": 300, "seq_len": 64}, r"only \d+ of 256 documents with >= 64 tokens"),
        (
            {"sampler": "nirvana", "n_samples": 40, "seq_len": 4096},
            r"only \d+ of \d+ documents longer than 4096 characters with >= 4096 tokens",
        ),
        ({"sampler": "wanda", "n_samples": 1, "seq_len": 100_000}, "0 of 256 documents with more than 100000 tokens"),
        (
            {"sampler": "wanda", "n_samples": 300, "seq_len": 64, "order": "file"},
            r"only \d+ of 256 documents with more than 64 tokens",
        ),
        (
            {"sampler": "stream", "join": " ", "n_samples": 10_000, "seq_len": 128, "order": "file"},
            "fewer than n_samples x seq_len = 10000 x 128",
        ),
        ({"sampler": "stream", "join": " ", "n_samples": 1, "seq_len": 10_000_000}, "too few for one window"),
        ({"sampler": "slicegpt", "n_samples": 200, "seq_len": 2048}, "slicegpt: 'c4' gives only"),
        ({"sampler": "documents", "n_samples": 257, "seq_len": 64}, "only 256 of 256 documents"),
        (
            {"sampler": "first_docs", "n_samples": 10, "seq_len": 400, "order": "file"},
            r"first_docs: document \d+ of 'c4' has \d+ tokens, fewer than seq_len=400",
        ),
    ],
)
def test_shapes_the_data_cannot_fill(tok, embedded, fields, match):
    with pytest.raises(InfeasibleCalibrationError, match=match) as e:
        draw(tok, **fields)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- variable-length statistics and ShortGPT


@pytest.fixture(scope="module")
def windows(tok):
    """A few documents' windows of 32 tokens with their tails: several lengths, lengths repeated."""
    return data.draw_calibration(
        tok,
        {"sampler": "documents", "dataset": "c4", "n_samples": 6, "seq_len": 32, "seed": 0, "order": "file"},
        progress=False,
    )


def test_collector_takes_windows_of_different_lengths(stories, windows):
    model, _, _ = stories
    assert len({len(w) for w in windows}) > 2
    stats = ("mean", "var", "sqnorm", "xtx")
    st = collect(
        model, windows, stats=stats + ("block_io",), sites=("o_proj", "down_proj"), batch_size=4, progress=False
    )
    assert st.n_samples == len(windows) and st.seq_len is None and st.n_tokens == sum(len(w) for w in windows)
    # independent: each window alone through the model (its own positions), all tokens pooled
    per_window = [site_inputs(model, w[None], ("o_proj", "down_proj", "block_in", "block_out")) for w in windows]
    for i in range(5):
        for site in ("o_proj", "down_proj"):
            x = np.concatenate([p[(i, site)].numpy() for p in per_window])
            s = st[i][site]
            assert s.n == x.shape[0] == st.n_tokens
            np.testing.assert_allclose(s.mean.numpy(), x.mean(0), rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(s.var.numpy(), x.var(0, ddof=1), rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(s.xtx.numpy(), x.T @ x, rtol=1e-8, atol=1e-8)
        a = np.concatenate([p[(i, "block_in")].numpy() for p in per_window]).astype(np.float64)
        b = np.concatenate([p[(i, "block_out")].numpy() for p in per_window]).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert st[i].block.cos_sum == pytest.approx(cos.sum(), rel=1e-10)
    # sequential (per-batch buffers) equals dense on an unpruned model
    seq = {
        s.layer: s.stats for s in sequential(model, windows, stats=stats, batch_size=3, prunes=False, progress=False)
    }
    for i in range(5):
        torch.testing.assert_close(seq[i]["down_proj"].xtx, st[i]["down_proj"].xtx, rtol=1e-9, atol=1e-9)


def test_equal_length_list_equals_the_tensor_exactly(stories, tok):
    model, _, _ = stories
    calib = data.calibration_batches(tok, "c4", 6, 32, 0, progress=False)
    a = collect(model, calib, stats=("mean", "xtx", "block_io"), sites=("down_proj",), batch_size=4, progress=False)
    b = collect(
        model, list(calib), stats=("mean", "xtx", "block_io"), sites=("down_proj",), batch_size=4, progress=False
    )
    for i in range(5):
        assert torch.equal(a[i]["down_proj"].xtx, b[i]["down_proj"].xtx) and a[i].block.cos_sum == b[i].block.cos_sum
    assert (a.n_tokens, a.seq_len) == (b.n_tokens, b.seq_len) == (192, 32)


def test_gradient_methods_refuse_variable_length(stories, windows):
    from pruning.methods.llm_bip import llm_bip
    from pruning.methods.llm_pruner import llm_pruner

    model, _, _ = stories
    with pytest.raises(PruningError, match="needs fixed-length calibration"):
        llm_pruner().prune(model, 0.2, windows)
    with pytest.raises(PruningError, match="llm_bip needs fixed-length calibration"):  # the template's check
        llm_bip(progress=False).prune(model, 0.2, windows)
    with pytest.raises(PruningError, match="gradient scoring needs fixed-length calibration"):
        fixed_length(windows, "gradient scoring")


@pytest.mark.parametrize("name", ["flap", "wanda_sp", "numerical", "slicegpt"])
def test_statistics_methods_take_variable_length(stories, windows, name):
    import importlib

    model, _, adapter = stories
    method = getattr(importlib.import_module(f"pruning.methods.{name}"), name)(progress=False)
    assert method.variable_length_calibration
    before = adapter.num_params()
    method.apply(model, method.prune(model, 0.2, windows), windows)
    assert adapter.num_params() < before


def official_block_influence_sums(model, windows) -> list[float]:
    """ShortGPT shortgpt.py compute_bi + metrics.py block_influence, copied: HF hidden_states, batch 1, fp32."""
    importances = [0.0] * len(model.model.layers)
    with torch.inference_mode():
        for w in windows:
            hiddens = model(input_ids=w[None], output_hidden_states=True).hidden_states
            for i in range(len(hiddens) - 1):
                x, y = hiddens[i].reshape(-1, hiddens[i].shape[-1]), hiddens[i + 1].reshape(-1, hiddens[i].shape[-1])
                sim = (x @ y.T) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1, keepdim=True))
                importances[i] += (1 - sim.diagonal().nan_to_num(nan=0.5)).sum().cpu().item()
    return importances


def test_shortgpt_block_influence_sums_equal_the_official_code(stories, tok):
    """On 30 documents (313 windows of 128, tails kept): our sums (float64) and the official code's (float32 per
    window); measured 2.2e-8 relative."""
    from pruning.methods.shortgpt import shortgpt

    model, _, _ = stories
    calib = data.draw_calibration(
        tok,
        {"sampler": "documents", "dataset": "c4", "n_samples": 30, "seq_len": 128, "seed": 0, "order": "file"},
        progress=False,
    )
    want = official_block_influence_sums(model, calib)
    plan = shortgpt(n_blocks=1, last_block="hf_hidden_states", progress=False).prune(model, 0.2, calib)
    got = [plan.meta["block_influence_sum"][i] for i in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert plan.meta["calibration_tokens"] == sum(len(w) for w in calib)
    assert plan.blocks == [int(np.argmin(want))]


@pytest.mark.slow
def test_shortgpt_reproduces_the_official_run(c4):
    """Fixture run shortgpt_remove1: all 2,000 documents, 128-token windows with tails, the last block against the
    final-normed state. Measured: the five sums within 2.1e-8 relative, block 3 removed, PPL 220.27164 (fixture
    220.27166); about 2 minutes on one thread, mostly the 2.58M calibration tokens."""
    from omegaconf import OmegaConf

    from pruning.eval import evaluate
    from pruning.methods.shortgpt import shortgpt
    from pruning.models import load_model

    run = RUNS["shortgpt_remove1"]
    model, tok, adapter = load_model(STORIES)
    calib = data.draw_calibration(
        tok,
        {"sampler": "documents", "dataset": "c4", "n_samples": None, "seq_len": 128, "seed": 0, "order": "file"},
        progress=False,
    )
    method = shortgpt(n_blocks=1, last_block="hf_hidden_states", batch_size=16, progress=False)
    plan = method.prune(model, 0.2, calib)
    got = [plan.meta["block_influence_sum"][i] for i in range(5)]
    np.testing.assert_allclose(got, run["block_influence_sums"], rtol=1e-6)
    assert plan.blocks == run["removed_blocks"] == [3]
    method.apply(model, plan)
    assert adapter.num_params() == run["params_after"]
    cfg = OmegaConf.create(
        {
            "ppl": [
                {
                    "name": "ppl128-lp",
                    "dataset": "wikitext2",
                    "split": "test",
                    "seq_len": 128,
                    "stride": 128,
                    "bos": "once",
                    "batch_size": 16,
                    "max_windows": None,
                }
            ]
        }
    )
    (res,) = evaluate(model, tok, cfg, progress=False)["ppl"].values()
    assert res["n_windows"] == 6367
    assert res["ppl"] == pytest.approx(run["ppl_wikitext2_test_ppl128"], rel=1e-6)


# ----------------------------------------------------------------------------------------- the cell and the record

REPO = Path(__file__).resolve().parents[1]


def compose_cell(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"store.dir={tmp_path / 'store'}", "progress=false", "eval=quick", "threads=1", *overrides],
        )


@pytest.fixture
def no_model_load(monkeypatch):
    """The cell must fail before the weights load: loading them is an error here."""
    from experiments import cell

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cell, "load_model", refuse)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (["calibration.sampler=bogus"], PruningError, "calibration.sampler='bogus': must be one of"),
        (
            ["method=llm_pruner", "calibration=shortgpt"],
            PruningError,
            "calibration.sampler=documents gives windows of different lengths, which llm_pruner_element1 cannot take",
        ),
        (
            [
                "method=wanda_sp",
                "calibration.sampler=llm_pruner",
                "calibration.n_samples=1000",
                "calibration.seq_len=2000",
            ],
            InfeasibleCalibrationError,
            "documents",
        ),
        (["method=wanda_sp", "calibration.seq_len=100000"], PruningError, "max_position_embeddings=2048"),
        (["method=flap", "calibration.order=file"], InfeasibleCalibrationError, "fewer than n_samples x seq_len"),
    ],
)
def test_cell_fails_before_the_model_loads(tmp_path, monkeypatch, no_model_load, overrides, error, match):
    from experiments.cell import run_cell

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))  # embedded slice: 256 documents, fast to tokenise
    cfg = compose_cell(tmp_path, *overrides)
    cfg.eval.ppl = cfg.eval.ppl[:1]  # WikiText-2 (embedded); PTB is not in the slice
    if "flap" in overrides[0]:
        cfg.calibration.n_samples = 10_000
    with pytest.raises(error, match=match):
        run_cell(cfg)
    assert not (tmp_path / "store" / "records").exists()


def test_record_names_sampler_and_cache_key_carries_it(tmp_path, monkeypatch):
    from experiments import cell

    monkeypatch.setenv("PRUNING_CACHE", str(tmp_path / "cache"))
    cfg = compose_cell(tmp_path, "method=shortgpt", "calibration.n_samples=12", "calibration.seq_len=64")
    rec = cell.run_cell(cfg)
    c = rec["calibration"]
    assert (c["sampler"], c["order"], c["join"], c["paper_dataset"]) == ("documents", "file", None, "pg19_validation")
    assert c["source"].endswith(("c4_validation_2k.parquet", "c4_validation_256.jsonl.gz"))
    assert c["used"] and c["n_windows"] > 12 and c["n_tokens"] == rec["plan"]["meta"]["calibration_tokens"]
    assert rec["config"]["calibration"]["sampler"] == "documents"
    key = cell.calib_key(cfg, "fp")
    assert {k: key[k] for k in ("sampler", "order", "join", "n_samples", "seq_len", "seed")} == {
        "sampler": "documents",
        "order": "file",
        "join": None,
        "n_samples": 12,
        "seq_len": 64,
        "seed": 0,
    }
    for change in ({"sampler": "llm_pruner", "n_samples": 12}, {"order": "random"}, {"seq_len": 32}):
        other = compose_cell(
            tmp_path,
            "method=shortgpt",
            "calibration.n_samples=12",
            "calibration.seq_len=64",
            *(f"calibration.{k}={v}" for k, v in change.items()),
        )
        assert cell.calib_key(other, "fp") != key
    # a label is not part of the draw
    labelled = compose_cell(
        tmp_path,
        "method=shortgpt",
        "calibration.n_samples=12",
        "calibration.seq_len=64",
        "calibration.paper_dataset=c4",
    )
    assert cell.calib_key(labelled, "fp") == key


def test_config_hash_of_llm_pruner_sampler_cells_is_unchanged():
    """Records written before samplers were selectable keep their identity: the new fields at their legacy values
    (and the paper_dataset label) are not hashed."""
    from experiments.record import config_hash

    old = {"method": {"_target_": "x"}, "calibration": {"dataset": "c4", "n_samples": 8, "seq_len": 64, "seed": 0}}
    new = {
        "method": {"_target_": "x"},
        "calibration": {
            **old["calibration"],
            "sampler": "llm_pruner",
            "order": "random",
            "join": None,
            "paper_dataset": "bookcorpus",
        },
    }
    assert config_hash(old) == config_hash(new)
    for change in ({"sampler": "wanda"}, {"order": "file"}, {"sampler": "stream", "join": " "}):
        assert config_hash({**new, "calibration": {**new["calibration"], **change}}) != config_hash(old)


def test_tables_read_a_missing_sampler_as_llm_pruner():
    from experiments.observations import _identity_leaves

    old = {
        "config": {
            "method": {"_target_": "m"},
            "calibration": {"dataset": "c4", "n_samples": 8, "seq_len": 64, "seed": 0},
        },
        "calibration": {"used": True},
    }
    new = {
        "config": {
            "method": {"_target_": "m"},
            "calibration": {**old["config"]["calibration"], "sampler": "wanda", "order": "random"},
        },
        "calibration": {"used": True},
    }
    assert _identity_leaves(old)[("calibration", "sampler")] == '"llm_pruner"'
    assert _identity_leaves(new)[("calibration", "sampler")] == '"wanda"'
