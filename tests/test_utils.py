"""The shared helpers: atomic writes, file hashes (experiments/fileio.py) and the torch ones (pruning/utils.py)."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
import torch

from experiments.fileio import atomic_file, atomic_write, sha256_file
from pruning.utils import eval_mode, input_device, module_device


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new", fsync=True, perms=0o644)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_file_error_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write("torn")
            raise RuntimeError("half way")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_sha256_file_matches_hashlib_over_chunks(tmp_path):
    data = os.urandom((1 << 22) + 12345)  # more than one 4 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_eval_mode_restores_training_flag_also_on_error(stories):
    model, _, adapter = stories
    model.train()
    with eval_mode(model):
        assert not model.training and not adapter.layers[0].training
    assert model.training and adapter.layers[0].training
    with pytest.raises(ValueError):
        with eval_mode(model):
            raise ValueError
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_input_device_is_the_embedding_device(stories):
    model, _, adapter = stories
    assert input_device(model) == adapter.embed_tokens.weight.device == torch.device("cpu")
    assert module_device(adapter.layers[0]) == adapter.layers[0].self_attn.q_proj.weight.device
    assert input_device(torch.nn.Linear(2, 2)) == torch.device("cpu")  # no get_input_embeddings: first parameter
