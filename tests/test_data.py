"""Data root, PPL texts and the calibration sampler, on the real offline data (METHODS.md §1.4, §1.6)."""

from __future__ import annotations

import gzip
import hashlib
import random

import pytest
import torch

from conftest import root_file
from pruning import data
from pruning.errors import DataError, PruningError

WT_SHA256 = "a26bd387e6f1d19e45ddbd7fe6fd5aef3f97f457863f0973e3327e68ac6daee8"  # data/ppl/wikitext2_raw/SOURCE.md


# ------------------------------------------------------------------------------------------------ data root


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))
    assert data.data_root() == tmp_path.resolve()
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="PRUNING_DATA"):
        data.data_root()


def test_missing_ptb_names_file_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        data.ppl_text("ptb", "validation")
    msg = str(e.value)
    assert "ptb.valid.txt" in msg and "PRUNING_DATA" in msg and "ptb" in msg
    with pytest.raises(DataError, match=r"alpaca_200\.json"):
        data.calibration_texts("alpaca")


def test_unknown_names_list_choices():
    with pytest.raises(PruningError, match="ptb/validation"):
        data.ppl_text("ptb", "train")
    with pytest.raises(PruningError, match="c4"):
        data.calibration_texts("pile")
    with pytest.raises(PruningError, match="test"):  # only the evaluated split exists offline
        data.calibration_texts("wikitext2")


# ------------------------------------------------------------------------------------------------ PPL texts


def test_wikitext2_text(wikitext_rows):
    text = data.ppl_text("wikitext2", "test")
    assert len(wikitext_rows) == 4358 and sum(r == "" for r in wikitext_rows) == 1467
    assert text == "\n\n".join(wikitext_rows)
    # Row 0 is empty, row 1 is the first heading: the joined string opens with the separator.
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert "\r" not in text and len(text) == 1294336


def test_embedded_wikitext_is_the_data_root_file(monkeypatch, tmp_path):
    root_text = data.ppl_text("wikitext2", "test")
    src = root_file("ppl/wikitext2_raw/test.jsonl")
    with gzip.open(data.ASSETS / "data/wikitext2_test.jsonl.gz", "rb") as f:
        embedded = f.read()
    assert embedded == src.read_bytes() and hashlib.sha256(embedded).hexdigest() == WT_SHA256
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))  # empty root -> embedded fallback
    assert data.ppl_source("wikitext2", "test").parent == data.ASSETS / "data"
    assert data.ppl_text("wikitext2", "test") == root_text


def test_embedded_assets_small_and_documented():
    d = data.ASSETS / "data"
    for name in ("wikitext2_test.jsonl.gz", "c4_validation_256.jsonl.gz"):
        assert (d / name).stat().st_size < 1_000_000
    source = (d / "SOURCE.md").read_text()
    assert "CC BY-SA 3.0" in source and "ODC-BY" in source and "build-assets" in source


def test_build_assets_is_reproducible(tmp_path):
    root_file("calib/c4/c4_validation_2k.parquet")
    data.build_assets(out=tmp_path)
    for name in ("wikitext2_test.jsonl.gz", "c4_validation_256.jsonl.gz", "SOURCE.md"):
        assert (tmp_path / name).read_bytes() == (data.ASSETS / "data" / name).read_bytes(), name


@pytest.mark.parametrize(
    "split,n,fname,first",
    [
        (
            "validation",
            3370,
            "ptb.valid.txt",
            "consumers may want to move their telephones a little closer to the tv set",
        ),
        ("test", 3761, "ptb.test.txt", "no it was n't black monday"),
    ],
)
def test_ptb_text(split, n, fname, first):
    raw = root_file(f"ppl/ptb/{fname}").read_text(encoding="utf-8").split("\n")
    assert raw[-1] == "" and len(raw) - 1 == n
    sentences = data.ppl_text("ptb", split).split("\n\n")
    assert len(sentences) == n  # METHODS.md §1.4: 3,370 validation / 3,761 test sentences
    # HF ptb_text_only: sentence = line.strip(); every raw line is " words ... \n".
    assert all(s and s == s.strip() for s in sentences)
    assert sentences[0] == first
    assert all(f" {s} " == line for s, line in zip(sentences, raw))


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_texts():
    c4 = data.calibration_texts("c4")
    assert all(isinstance(t, str) and t for t in c4)
    if data.calibration_source("c4").suffix == ".parquet":
        assert len(c4) == 2000
        assert data.calibration_texts("alpaca")[0].endswith(
            "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1.Eat a balanced diet"
            " and make sure to include plenty of fruits and vegetables. \n2. Exercise regularly to keep your body"
            " active and strong. \n3. Get enough sleep and maintain a consistent sleep schedule."
        )


def test_calibration_shape_and_seed(tiny):
    _, tok = tiny
    a = data.calibration_batches(tok, "c4", 8, 64, seed=0, progress=False)
    b = data.calibration_batches(tok, "c4", 8, 64, seed=0, progress=False)
    c = data.calibration_batches(tok, "c4", 8, 64, seed=1, progress=False)
    assert a.dtype == torch.long and a.shape == (8, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _llm_pruner_reference(tok, texts, n_samples, seq_len, seed):
    """LLM-Pruner's get_c4/get_bookcorpus loop written out plainly (tokenise each draw, redraw until long+new)."""
    rng = random.Random(seed)
    history, out, docs = [], [], []
    for _ in range(n_samples):
        while True:
            i = rng.randint(0, len(texts) - 1)
            ids = tok(texts[i], return_tensors="pt").input_ids
            if ids.shape[1] >= seq_len and i not in history:
                history.append(i)
                break
        j = rng.randint(0, ids.shape[1] - seq_len)
        out.append(ids[:, j : j + seq_len])
        docs.append(ids[0].tolist())
    return torch.cat(out, dim=0), docs


def test_calibration_matches_llm_pruner_and_windows_are_contiguous(tiny, monkeypatch, tmp_path):
    _, tok = tiny
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))  # the embedded 256-document C4 slice: fast to tokenise
    assert data.calibration_source("c4").name == "c4_validation_256.jsonl.gz"
    texts = data.calibration_texts("c4")
    assert len(texts) == 256
    got = data.calibration_batches(tok, "c4", 10, 64, seed=42, progress=False)
    want, _ = _llm_pruner_reference(tok, texts, 10, 64, 42)
    assert torch.equal(got, want)
    # Every window is a contiguous run of one document's own tokens (BOS included in that tokenisation).
    doc_strings = [f",{','.join(map(str, tok(t).input_ids))}," for t in texts]
    for row in got.tolist():
        needle = f",{','.join(map(str, row))},"
        assert any(needle in d for d in doc_strings)
    assert (got[:, 0] == tok.bos_token_id).sum() <= 10  # BOS only where a window starts at a document start


def test_calibration_too_few_documents(tiny, monkeypatch, tmp_path):
    _, tok = tiny
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path))
    lens = [len(tok(t).input_ids) for t in data.calibration_texts("c4")]
    n_ok = sum(n >= 4096 for n in lens)
    with pytest.raises(PruningError, match=rf"only {n_ok} of 256 documents with >= 4096 tokens"):
        data.calibration_batches(tok, "c4", n_ok + 1, 4096, seed=0, progress=False)
    # Exactly n_ok samples still works (the sampler does not give up early).
    assert data.calibration_batches(tok, "c4", n_ok, 4096, seed=0, progress=False).shape == (n_ok, 4096)
