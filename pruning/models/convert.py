"""Convert a GGUF checkpoint into a plain Hugging Face checkpoint directory.

Why: a GGUF-loaded model carries a GgufHfQuantizer and cannot be saved, and some llama.cpp files (stories260K)
store "no token" as uint32 -1 for padding/separator ids, which breaks transformers' tokenizer and the embedding's
padding_idx. We drop those two keys from a temporary copy, load through transformers (which dequantises any
quantised tensors to float32), and save a plain ``LlamaForCausalLM`` + tokenizer.

    python -m pruning.models.convert --gguf ../shared/data/models/stories260K/stories260K.gguf \
        --out pruning/assets/stories260K

Re-running gives byte-identical weights.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BOGUS_KEYS = ("tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip_bogus_metadata(src: Path, dst: Path) -> None:
    """Rewrite ``src`` without the uint32(-1) "none" ids, using gguf's own CLI."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    present = [k for k in BOGUS_KEYS if k in reader.fields and int(reader.fields[k].parts[-1][0]) == 0xFFFFFFFF]
    if not present:
        shutil.copyfile(src, dst)
        return
    cli = Path(sys.executable).with_name("gguf-new-metadata")
    cmd = [str(cli)] + [a for k in present for a in ("--remove-metadata", k)] + ["--force", str(src), str(dst)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def convert(gguf_path: str | Path, out_dir: str | Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    with tempfile.TemporaryDirectory() as tmp:
        fixed = Path(tmp) / gguf_path.name
        _strip_bogus_metadata(gguf_path, fixed)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=fixed.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=fixed.name, dtype=torch.float32)
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["pad_token_id"] = None
        config = LlamaConfig.from_dict(cfg)
        with torch.device("meta"):
            plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        tmp_out = Path(tmp) / "out"
        plain.save_pretrained(tmp_out)
        tok.save_pretrained(tmp_out)
        (tmp_out / "CONVERTED_FROM").write_text(f"{gguf_path.name} sha256={_sha256(gguf_path)}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp_out, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="path to the .gguf file")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    args = p.parse_args(argv)
    out = convert(args.gguf, args.out)
    for f in sorted(out.iterdir()):
        print(f"{f.name:28s} {f.stat().st_size:>10d}  {_sha256(f)[:16]}")


if __name__ == "__main__":
    main()
