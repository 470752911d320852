"""Convert a GGUF checkpoint into a plain Hugging Face checkpoint directory, and cache conversions per user.

Why: a GGUF-loaded model carries a GgufHfQuantizer and cannot be saved, and some llama.cpp files (stories260K)
store "no token" as uint32 -1 for padding/separator ids, which breaks transformers' tokenizer and the embedding's
padding_idx. We drop those two keys from a temporary copy, load through transformers (which dequantises any
quantised tensors to float32), and save a plain model of the file's own architecture (``general.architecture``:
``LlamaForCausalLM`` for llama, ``Qwen2ForCausalLM`` for qwen2, ...) + tokenizer. An architecture no family adapter
supports is rejected from the GGUF's metadata, before the slow dequantisation. Tied input/output embeddings
(SmolLM2) stay tied: the config keeps ``tie_word_embeddings`` and the matrix is stored once; an untied head
(Qwen2.5-Coder's separate ``output.weight``) stays untied.

    pruning-lab convert --gguf ../shared/data/models/stories260K/stories260K.gguf \
        --out pruning/assets/stories260K

Re-running gives byte-identical files. Without ``--out`` the command fills the user cache below instead.

Dequantising a real model (SmolLM2-135M: ~30 s on 2 cores) is too slow to repeat on every run, so
``cached_conversion`` converts once per GGUF content into a user cache directory (never inside the repo):
``$PRUNING_CACHE``, else ``$XDG_CACHE_HOME/pruning-lab``, else ``~/.cache/pruning-lab``. Layout::

    <cache>/gguf/<gguf sha256>-v<CONVERTER_VERSION>/   plain checkpoint + COMPLETE (sha256 + size of every file)
    <cache>/gguf/<...>.verified                        (size, mtime_ns) of each file when it last hashed clean
    <cache>/gguf/<...>.lock                            serialises conversions of one GGUF across processes
    <cache>/hashes/<sha1 of the GGUF's real path>.json (path, size, mtime_ns) -> sha256, so the GGUF is hashed once

An entry is written into a temporary sibling and renamed into place after COMPLETE is written, so a crash leaves
no entry rather than a partial one. A load checks every file's size against COMPLETE and its (size, mtime)
against the ``.verified`` stamps (milliseconds); a file whose stamp changed is re-hashed against COMPLETE, so a
truncated or rewritten file is caught and the entry is rebuilt, never used. The stamps live outside the entry so
that the entry's content (and the run records' checkpoint fingerprint) is the same on every machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.fileio import atomic_write, sha256_file

BOGUS_KEYS = ("tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id")
# Bump whenever convert()'s output changes, so cached conversions made by older code are rebuilt, not reused.
CONVERTER_VERSION = 2
COMPLETE = "COMPLETE"


def _log(msg: str) -> None:
    print(f"[pruning] {msg}", file=sys.stderr, flush=True)


def _bogus_keys(src: Path) -> list[str]:
    import gguf

    reader = gguf.GGUFReader(str(src))
    return [k for k in BOGUS_KEYS if k in reader.fields and int(reader.fields[k].parts[-1][0]) == 0xFFFFFFFF]


def _stage_gguf(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` for transformers: a copy without the uint32(-1) "none" ids, else a symlink.

    Always staged in a private directory so that stray files next to the GGUF (a tokenizer_config.json, say)
    cannot leak into the load.
    """
    present = _bogus_keys(src)
    if not present:
        os.symlink(src.resolve(), dst)
        return
    cli = Path(sys.executable).with_name("gguf-new-metadata")
    cmd = [str(cli)] + [a for k in present for a in ("--remove-metadata", k)] + ["--force", str(src), str(dst)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _manifest(directory: Path) -> dict[str, dict]:
    return {
        f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(directory.iterdir())
        if f.is_file() and f.name != COMPLETE
    }


def check_fit(cls_name: str, missing, unexpected, mismatched) -> None:
    """Raise, in one line, when weights and model do not match exactly: the first missing, unexpected and
    mismatched keys, so the reason survives a one-line error (torch's and transformers' messages put it on later
    lines, or in a printed report). A weight the GGUF lacks would otherwise be left at random init, silently."""
    problems = [
        f"{len(keys)} {what} (first: {sorted(map(str, keys))[0]})"
        for what, keys in (
            ("missing weights", missing),
            ("unexpected weights", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise RuntimeError(f"the GGUF's tensors do not fit {cls_name}: {'; '.join(problems)}")


def load_exactly(model, state: dict) -> None:
    """``load_state_dict(strict=True, assign=True)`` after ``check_fit``."""
    own = model.state_dict()
    check_fit(
        type(model).__name__,
        [k for k in own if k not in state],
        [k for k in state if k not in own],
        [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ],
    )
    model.load_state_dict(state, strict=True, assign=True)


def convert(
    gguf_path: str | Path, out_dir: str | Path, *, gguf_sha256: str | None = None, complete_marker: bool = False
) -> Path:
    """Write the plain checkpoint atomically: ``out_dir`` is either the old directory or the complete new one.

    ``complete_marker`` adds COMPLETE (sha256 and size of every file) as the last file before the rename; the
    user cache verifies it on every load.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pruning.models.adapter import adapter_class

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    gguf_sha256 = gguf_sha256 or sha256_file(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_out, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        with tempfile.TemporaryDirectory() as stage:
            staged = Path(stage) / gguf_path.name
            _stage_gguf(gguf_path, staged)
            # The architecture from the metadata alone (no tensor read): an unsupported family is one clear line
            # (UnsupportedModelError) before the dequantisation, which takes ~30 s per 100M parameters.
            adapter_class(AutoConfig.from_pretrained(stage, gguf_file=staged.name))
            tok = AutoTokenizer.from_pretrained(stage, gguf_file=staged.name)
            # A load-time flag (True under HF_HUB_OFFLINE) that save_pretrained writes out; fixed so that the
            # files, and the checkpoint fingerprint in run records, do not depend on the conversion's environment.
            tok.init_kwargs["local_files_only"] = False
            loaded: Any = AutoModelForCausalLM.from_pretrained(  # (model, loading info): output_loading_info
                stage,
                gguf_file=staged.name,
                dtype=torch.float32,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
            )  # mismatches are reported by check_fit, with their names
            gguf_model, info = loaded
            check_fit(
                type(gguf_model).__name__,
                info["missing_keys"],
                info["unexpected_keys"],
                [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info["mismatched_keys"]],
            )
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        pad = cfg.get("pad_token_id")
        if not (isinstance(pad, int) and 0 <= pad < cfg["vocab_size"]):
            cfg["pad_token_id"] = None
        config = type(gguf_model.config).from_dict(cfg)  # LlamaConfig, Qwen2Config, ...: the file's family
        with torch.device("meta"):
            plain = type(gguf_model)(config)  # the class transformers mapped that family to
        load_exactly(plain, gguf_model.state_dict())
        plain.tie_weights()
        if config.tie_word_embeddings and plain.lm_head.weight is not plain.model.embed_tokens.weight:
            raise RuntimeError(f"{gguf_path.name}: tie_word_embeddings is set but the embeddings did not tie")
        plain.save_pretrained(tmp_out)
        tok.save_pretrained(tmp_out)
        (tmp_out / "CONVERTED_FROM").write_text(f"{gguf_path.name} sha256={gguf_sha256}\n")
        if complete_marker:
            marker = {
                "gguf": gguf_path.name,
                "gguf_sha256": gguf_sha256,
                "converter_version": CONVERTER_VERSION,
                "transformers": transformers.__version__,
                "files": _manifest(tmp_out),
            }
            (tmp_out / COMPLETE).write_text(json.dumps(marker, indent=1, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_out.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------------- user cache


def cache_root() -> Path:
    """Resolved on every call (not cached), so a changed $PRUNING_CACHE (tests) takes effect."""
    if os.environ.get("PRUNING_CACHE"):
        return Path(os.environ["PRUNING_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pruning-lab"


def _hash_stamp(path: Path) -> tuple[dict, Path]:
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return stamp, cache_root() / "hashes" / f"{hashlib.sha1(str(path).encode()).hexdigest()}.json"


def _remember(stamp: dict, sidecar: Path, digest: str) -> None:
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(sidecar, json.dumps({**stamp, "sha256": digest}))


def remember_sha256(path: str | Path, digest: str) -> None:
    """Record a digest computed while writing ``path`` (pruning.models.fetch), so it is not hashed again."""
    _remember(*_hash_stamp(Path(path).resolve()), digest)


def gguf_sha256(path: str | Path) -> str:
    """sha256 of a GGUF, hashed once per (real path, size, mtime_ns) and remembered in the cache's sidecar."""
    path = Path(path).resolve()
    stamp, sidecar = _hash_stamp(path)
    try:
        known = json.loads(sidecar.read_text())
        if {k: known.get(k) for k in stamp} == stamp and len(known.get("sha256", "")) == 64:
            return known["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable sidecar: hash again
    digest = sha256_file(path)
    _remember(stamp, sidecar, digest)  # the stamp from before hashing: a file changed meanwhile is hashed again
    return digest


def cache_entry(sha256: str) -> Path:
    return cache_root() / "gguf" / f"{sha256}-v{CONVERTER_VERSION}"


def _stamps_path(entry: Path) -> Path:
    return entry.parent / f"{entry.name}.verified"


def _stamps(entry: Path, names) -> dict[str, list[int]]:
    return {n: [(entry / n).stat().st_size, (entry / n).stat().st_mtime_ns] for n in sorted(names)}


def verify_entry(entry: Path, full: bool = False) -> str | None:
    """Why ``entry`` must not be used (missing, partial, corrupt), or None when every file matches COMPLETE.

    Cheap when nothing changed: sizes against COMPLETE, then (size, mtime) against the stamps of the last clean
    hash. Any other case (new machine, copied entry, touched file, ``full``) hashes every file (~1 s for 135M).
    """
    if not entry.is_dir():
        return "missing"
    try:
        marker = json.loads((entry / COMPLETE).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} marker (partial write)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} marker ({type(e).__name__})"
    if marker.get("converter_version") != CONVERTER_VERSION or not any(n.endswith(".safetensors") for n in files):
        return f"{COMPLETE} marker from another converter version"
    for name, want in files.items():  # sizes first: a truncated file is caught without hashing anything
        f = entry / name
        if not f.is_file() or f.stat().st_size != want["size"]:
            return f"{name} is missing or has the wrong size"
    stamps = _stamps(entry, files)
    if not full:
        try:
            if json.loads(_stamps_path(entry).read_text()) == stamps:
                return None
        except (OSError, ValueError):
            pass
    for name, want in files.items():
        if sha256_file(entry / name) != want["sha256"]:
            return f"{name} does not match its sha256"
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        atomic_write(_stamps_path(entry), json.dumps(stamps))
    return None


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Exclusive lock across processes (a Hydra sweep may start several cells on a cold cache at once)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_conversion(gguf_path: str | Path) -> Path:
    """The plain checkpoint converted from ``gguf_path``: verified from the cache, else converted once."""
    gguf_path = Path(gguf_path)
    sha = gguf_sha256(gguf_path)
    entry = cache_entry(sha)
    if verify_entry(entry) is None:
        return entry
    with _locked(entry.parent / f"{entry.name}.lock"):
        problem = verify_entry(entry)  # another process may have finished it while we waited
        if problem is None:
            return entry
        for stale in entry.parent.glob(f".{entry.name}.*"):  # temp dirs of crashed conversions
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _stamps_path(entry).unlink(missing_ok=True)
        if problem != "missing":
            _log(f"cache entry {entry} is unusable ({problem}); rebuilding it")
            shutil.rmtree(entry)
        _log(
            f"converting {gguf_path.name} (sha256 {sha[:12]}, {gguf_path.stat().st_size / 1e6:.0f} MB) to a plain "
            f"float32 checkpoint in {entry}; once per GGUF (SmolLM2-135M: 20-30 s on 2 cores)"
        )
        t0 = time.perf_counter()
        convert(gguf_path, entry, gguf_sha256=sha, complete_marker=True)
        files = json.loads((entry / COMPLETE).read_text())["files"]  # hashed just now, before the rename
        atomic_write(_stamps_path(entry), json.dumps(_stamps(entry, files)))
        _log(f"converted in {time.perf_counter() - t0:.1f} s")
    return entry


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="path to the .gguf file")
    p.add_argument("--out", help="output directory (replaced if it exists); default: the user cache entry")
    args = p.parse_args(argv)
    out = convert(args.gguf, args.out) if args.out else cached_conversion(args.gguf)
    for f in sorted(out.iterdir()):
        print(f"{f.name:28s} {f.stat().st_size:>10d}  {sha256_file(f)[:16]}")


if __name__ == "__main__":
    main()
