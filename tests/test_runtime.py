"""dtype / device / device_map / seed policy (``pruning.runtime``) and its pass-through to ``from_pretrained``, on
the real stories260K checkpoint."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import STORIES, logits
from pruning import data
from pruning.errors import PruningError
from pruning.importance.taylor import taylor_scorer
from pruning.methods.llm_pruner import llm_pruner
from pruning.models import load_model
from pruning.runtime import check_device, normalize_device_map, resolve_dtype, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's errors")


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))  # noqa: NPY002 - the seeded global RNG


def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(7)
    a = draws()
    seed_everything(7)
    assert draws() == a
    seed_everything(8)
    b = draws()
    assert all(x != y for x, y in zip(a, b))
    with pytest.raises(PruningError, match="integer"):
        seed_everything("seven")


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # slow on CPU, but sound
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(PruningError, match="float16 on CPU"):
        resolve_dtype("float16", "cpu")
    with pytest.raises(PruningError, match="float16 on CPU"):
        resolve_dtype("float16", "cpu", device_map={"": "cpu"})
    with pytest.raises(PruningError, match="unknown dtype 'fp8'; choices: float32"):
        resolve_dtype("fp8", "cpu")


@NO_CUDA
def test_gpu_placements_on_a_cpu_only_machine_fail_in_one_line():
    for dm in (0, "cuda:0", {"": 0}, {"model.embed_tokens": "cpu", "model.layers": "cuda:1"}):
        with pytest.raises(PruningError, match="CUDA is not available"):
            normalize_device_map(dm)
    with pytest.raises(PruningError, match="CUDA is not available"):
        check_device("cuda")
    with pytest.raises(PruningError, match="CUDA is not available"):
        load_model(STORIES, device_map="cuda:0")
    assert check_device("auto") == "cpu"


def test_bad_device_maps():
    with pytest.raises(PruningError, match="not a device"):
        normalize_device_map({"": "gpu"})
    with pytest.raises(PruningError, match="must be null"):
        normalize_device_map(["cpu"])
    with pytest.raises(PruningError, match="empty dict"):
        normalize_device_map({})
    with pytest.raises(PruningError, match="not a torch device"):
        check_device("tpu9")


@NO_CUDA
def test_auto_device_map_falls_back_to_cpu(capsys, stories_text_ids):
    model, _, _ = load_model(STORIES, device_map="auto")
    assert "without CUDA" in capsys.readouterr().err
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_device_map_and_dtype_pass_through_to_from_pretrained(stories_text_ids):
    from omegaconf import OmegaConf

    ref, _, _ = load_model(STORIES)
    want = logits(ref, stories_text_ids)
    for dm in ("cpu", {"": "cpu"}, OmegaConf.create({"": "cpu"})):  # a Hydra dict arrives as a DictConfig
        model, _, _ = load_model(STORIES, device_map=dm)
        assert getattr(model, "hf_device_map", {"": "cpu"}) == {"": "cpu"}
        assert torch.equal(logits(model, stories_text_ids), want)
    bf, _, _ = load_model(STORIES, "bfloat16", device_map={"": "cpu"})
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(bf, stories_text_ids).float(), want, atol=0.5, rtol=0.05)
    auto, _, _ = load_model(STORIES, "auto")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}


def test_float16_scoring_on_cpu_is_refused_before_any_pass(stories):
    model, tok, _ = stories
    model.half()
    calib = data.calibration_batches(tok, "c4", 2, 16, 0, progress=False)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(PruningError, match="float16 on CPU"):
        taylor_scorer("element1").fit(model, calib, llm_pruner().sets(model))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_cell_refuses_float16_on_cpu_before_loading(tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from experiments.cell import run_cell

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[f"store.dir={tmp_path}", "model.dtype=float16", "progress=false"])
    with pytest.raises(PruningError, match="float16 on CPU"):
        run_cell(cfg)
    assert not list(tmp_path.rglob("*.json"))
