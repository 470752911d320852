"""The one place that reads data: the data root, the PPL evaluation texts and the calibration samplers.

Why one module: every protocol detail that changes a published number (which split, how rows are joined, where BOS
goes, how calibration documents are drawn) lives here and in ``pruning.eval.perplexity``, nowhere else.

Data root (DESIGN.md "Data root"): ``$PRUNING_DATA`` if set, else ``../shared/data`` next to the repo, else
``../shared/data`` next to the working directory. Small defaults ship in ``pruning/assets/data`` (see its SOURCE.md)
so a fresh clone can evaluate WikiText-2 and calibrate on C4 with no data root at all; they are rebuilt by

    python -m pruning.data build-assets
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import sys
from pathlib import Path

import pruning
from pruning.errors import DataError, InfeasibleCalibrationError, PruningError

ASSETS = Path(pruning.__file__).parent / "assets"
EMBEDDED = ASSETS / "data"

# (dataset, split) -> path under the data root. PTB "validation" is what LLM-Pruner/Search-LLM call test (§1.4).
PPL_FILES: dict[tuple[str, str], str] = {
    ("wikitext2", "test"): "ppl/wikitext2_raw/test.jsonl",
    ("ptb", "validation"): "ppl/ptb/ptb.valid.txt",
    ("ptb", "test"): "ppl/ptb/ptb.test.txt",
    ("c4", "heldout"): "calib/c4/c4_validation_2k.parquet",   # C4_HELDOUT_DOCS: search objectives (AdaPruner)
}
PPL_EMBEDDED: dict[tuple[str, str], str] = {("wikitext2", "test"): "wikitext2_test.jsonl.gz"}

CALIB_FILES: dict[str, str] = {
    "c4": "calib/c4/c4_validation_2k.parquet",
    "alpaca": "calib/alpaca/alpaca_200.json",
    "c4_search": "calib/c4/c4_validation_2k.parquet",   # the c4 documents outside C4_HELDOUT_DOCS
}
# A block of C4 documents that a search (AdaPruner, METHODS.md §3.10) scores candidates on, as PPL text
# ("c4"/"heldout"), so that the objective never saw its calibration data. Search calibration uses "c4_search", the
# other documents (a fresh draw sequence over 1,800 documents). Plain "c4" keeps all 2,000 documents on purpose:
# excluding the block there would change every existing c4 draw sequence that ever reached it (e.g. 128 x 128,
# seed 0 draws document 1977 third), so results already in stores would no longer reproduce.
C4_HELDOUT_DOCS = range(1800, 2000)
CALIB_EMBEDDED: dict[str, str] = {"c4": "c4_validation_256.jsonl.gz"}
# Names people will try that are deliberately refused, with the reason.
CALIB_REFUSED: dict[str, str] = {
    "wikitext2": (
        "only the WikiText-2 *test* split is available offline, and it is an evaluation text; calibrating on "
        "evaluated text makes the pruned model's PPL look better than it is (METHODS.md §1.6). Use calibration.dataset=c4"
    ),
    "ptb": "PTB validation/test are evaluation texts and PTB train is not in the data root; use c4",
    "bookcorpus": "BookCorpus is not in the offline data root; c4 is the documented substitute (METHODS.md §1.6)",
}
N_C4_EMBEDDED = 256

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)


# --------------------------------------------------------------------------------------------------- data root


def data_root() -> Path | None:
    """Resolved on every call, not cached, so a changed $PRUNING_DATA (tests, notebooks) takes effect."""
    env = os.environ.get("PRUNING_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"$PRUNING_DATA={env!r} is not a directory; point it at a data root such as ../shared/data")
        return root.resolve()
    repo = Path(pruning.__file__).resolve().parents[1]
    for cand in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def _root_file(rel: str) -> Path | None:
    root = data_root()
    if root is None:
        return None
    p = root / rel
    return p if p.is_file() else None


def _missing(rel: str, what: str) -> DataError:
    root = data_root()
    where = f"{root / rel}" if root is not None else f"<no data root>/{rel}"
    return DataError(
        f"{what}: file not found: {where}. Supply it by setting $PRUNING_DATA to a directory containing {rel} "
        f"(the layout of ../shared/data, see its README.md)."
    )


def ppl_source(dataset: str, split: str) -> Path:
    """The file ppl_text would read: the data-root file if present, else the embedded copy (WikiText-2 only).

    Exposed so run code can fail before loading a model and record which copy was read.
    """
    key = (dataset, split)
    if key not in PPL_FILES:
        choices = ", ".join(f"{d}/{s}" for d, s in PPL_FILES)
        raise PruningError(f"unknown PPL dataset/split {dataset}/{split}; choices: {choices}")
    found = _root_file(PPL_FILES[key])
    if found is not None:
        return found
    if key in PPL_EMBEDDED:
        return EMBEDDED / PPL_EMBEDDED[key]
    raise _missing(PPL_FILES[key], f"PPL text for dataset {dataset!r} split {split!r}")


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------- PPL texts


def ppl_text(dataset: str, split: str) -> str:
    """The exact string the papers tokenise for PPL (METHODS.md §1.4); any byte difference changes the number."""
    path = ppl_source(dataset, split)
    if (dataset, split) == ("c4", "heldout"):
        return "\n\n".join(c4_documents(path, C4_HELDOUT_DOCS))
    if dataset == "wikitext2":
        # HF rows, empty rows included; the join reproduces "\n\n".join(ds["test"]["text"]).
        return "\n\n".join(r["text"] for r in _read_jsonl(path))
    # PTB: HF ptb_text_only yields sentence = line.strip() for each line of ptb.*.txt. Every line is
    # " words ... \n", so strip() removes the leading space, the trailing space and the newline.
    with open(path, encoding="utf-8", newline="") as f:
        sentences = [line.strip() for line in f]
    return "\n\n".join(sentences)


# --------------------------------------------------------------------------------------------------- calibration


def calibration_source(dataset: str) -> Path:
    """The file calibration_texts would read (data root first, then the embedded slice)."""
    if dataset in CALIB_REFUSED:
        raise PruningError(f"calibration dataset {dataset!r} is not allowed: {CALIB_REFUSED[dataset]}")
    if dataset not in CALIB_FILES:
        raise PruningError(f"unknown calibration dataset {dataset!r}; choices: {', '.join(CALIB_FILES)}")
    found = _root_file(CALIB_FILES[dataset])
    if found is not None:
        return found
    if dataset in CALIB_EMBEDDED:
        return EMBEDDED / CALIB_EMBEDDED[dataset]
    raise _missing(CALIB_FILES[dataset], f"calibration data for dataset {dataset!r}")


def _alpaca_text(rec: dict) -> str:
    # The Stanford Alpaca training prompt plus the answer, i.e. what tatsu-lab/alpaca's "text" column holds and
    # what SliceGPT calibrates on; it is also the template LLM-Pruner's LoRA recovery trains on, so calibration
    # sees the same distribution as recovery.
    return alpaca_prompt(rec)


def alpaca_prompt(rec: dict, response: bool = True) -> str:
    """The Alpaca template (alpaca-lora's templates/alpaca.json); ``response=False`` gives the prompt alone, the
    prefix LoRA recovery masks out of the loss (LLM-Pruner's train_on_inputs=False)."""
    tpl = ALPACA_PROMPT_INPUT if rec.get("input") else ALPACA_PROMPT
    return tpl.format(instruction=rec["instruction"], input=rec.get("input", ""),
                      output=rec["output"] if response else "")


def instruction_records(dataset: str) -> tuple[list[dict], Path]:
    """{instruction, input, output} records and the file read: a known name (``alpaca``: data root, 200 records)
    or a path to an Alpaca-format .json array / .jsonl (e.g. the full alpaca_data_cleaned.json)."""
    if dataset in CALIB_FILES and dataset != "alpaca":
        raise PruningError(f"{dataset!r} is plain text, not instruction records; instruction data: alpaca or a "
                           f".json/.jsonl file of {{instruction, input, output}} records")
    path = calibration_source(dataset) if dataset == "alpaca" else Path(dataset).expanduser()
    if path.suffix not in (".json", ".jsonl") or not path.is_file():
        raise DataError(f"instruction data {dataset!r}: expected the name alpaca or an existing .json/.jsonl file "
                        f"of {{instruction, input, output}} records")
    try:
        recs = _read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"instruction data {path}: unreadable ({e})") from e
    if not isinstance(recs, list) or not recs:
        raise DataError(f"instruction data {path}: expected a non-empty list of records")
    bad = next((i for i, r in enumerate(recs) if not (isinstance(r, dict) and "instruction" in r and "output" in r)),
               None)
    if bad is not None:
        raise DataError(f"instruction data {path}: record {bad} lacks instruction/output (Alpaca format expected)")
    return recs, path


def calibration_texts(dataset: str) -> list[str]:
    """Documents (one string each) for the calibration sampler; order is the file's, so seeds are reproducible."""
    path = calibration_source(dataset)
    if path.name.endswith(".jsonl.gz"):
        return [r["text"] for r in _read_jsonl(path)]
    if dataset == "c4":
        return c4_documents(path)
    if dataset == "c4_search":
        held = set(C4_HELDOUT_DOCS)
        return [t for i, t in enumerate(c4_documents(path)) if i not in held]
    if dataset == "alpaca":
        with open(path, encoding="utf-8") as f:
            return [_alpaca_text(r) for r in json.load(f)]
    raise AssertionError(dataset)  # pragma: no cover


def c4_documents(path: Path, rows: range | None = None) -> list[str]:
    """The C4 parquet's ``text`` column in file order (optionally only ``rows``)."""
    import pyarrow.parquet as pq

    docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return docs if rows is None else docs[rows.start:rows.stop]


def _tokenizer_key(tokenizer) -> tuple:
    return (
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "add_bos_token", None),
    )


# (tokenizer key, text digest) -> {doc index: token ids}; documents are tokenised lazily, only when drawn.
_DOC_TOKENS: dict[tuple, dict[int, list[int]]] = {}


def calibration_batches(
    tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int, progress: bool = True
) -> "torch.LongTensor":
    """LLM-Pruner's sampler (example_samples.py, METHODS.md §1.6), with its exact draw sequence for a given seed.

    Why lazy: LLM-Pruner draws a random index, tokenises that document alone (tokenizer defaults, so BOS
    included) and redraws until it has >= seq_len tokens and was not used before; then takes a random seq_len window.
    We replay that with ``random.Random(seed)`` (same stream as ``random.seed(seed)``), tokenising only drawn
    documents. Once every document has been tokenised we know exactly how many qualify and fail instead of looping.
    """
    import torch
    from tqdm.auto import tqdm

    texts = calibration_texts(dataset)
    if n_samples < 1 or seq_len < 2:
        raise PruningError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    n_docs = len(texts)
    digest = hashlib.sha1("\x00".join(texts).encode("utf-8")).hexdigest()
    cache = _DOC_TOKENS.setdefault((_tokenizer_key(tokenizer), digest), {})

    def qualifying() -> int:
        return sum(len(ids) >= seq_len for ids in cache.values())

    def too_few() -> PruningError:
        return InfeasibleCalibrationError(
            f"calibration dataset {dataset!r} has only {qualifying()} of {n_docs} documents with >= {seq_len} "
            f"tokens, fewer than n_samples={n_samples}; lower calibration n_samples or seq_len"
        )

    if n_samples > n_docs or (len(cache) == n_docs and qualifying() < n_samples):
        if len(cache) < n_docs:  # count exactly for the message
            for i in range(n_docs):
                cache.setdefault(i, tokenizer(texts[i]).input_ids)
        raise too_few()

    rng = random.Random(seed)
    used: set[int] = set()
    rows: list[list[int]] = []
    bar = tqdm(total=n_samples, desc=f"calibration {dataset}", unit="sample", disable=not progress, delay=1.0)
    try:
        for _ in range(n_samples):
            while True:
                i = rng.randint(0, n_docs - 1)
                ids = cache.get(i)
                if ids is None:
                    ids = cache[i] = tokenizer(texts[i]).input_ids
                    bar.set_postfix(docs_tokenised=len(cache), refresh=False)
                    if len(cache) == n_docs and qualifying() - len(used) < n_samples - len(rows):
                        raise too_few()
                if len(ids) >= seq_len and i not in used:
                    used.add(i)
                    break
            j = rng.randint(0, len(ids) - seq_len)
            rows.append(ids[j : j + seq_len])
            bar.update(1)
    finally:
        bar.close()
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------------- assets


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _gzip_bytes(raw: bytes) -> bytes:
    # filename="" and mtime=0 keep the header free of paths and times, so rebuilding is byte-identical.
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


_SOURCE_MD = """\
# Embedded data defaults

Small copies of the offline data root (`../shared/data`) so that a fresh clone can evaluate WikiText-2 PPL and
calibrate on C4 with no data root. `pruning.data` reads the data root first and falls back to these files only when
the data-root file is absent. Rebuild (byte-identical; gzip header has no name and mtime 0):

    python -m pruning.data build-assets            # reads the current data root, writes pruning/assets/data/

| file | bytes | sha256 (.gz) | sha256 (decompressed) | derived from |
|---|---|---|---|---|
{rows}

## wikitext2_test.jsonl.gz

Byte-identical (after decompression) to the data root's `ppl/wikitext2_raw/test.jsonl`: the 4,358 rows of HF
`wikitext` / `wikitext-2-raw-v1` **test**, one `{{"text": ...}}` per line, empty rows included. Origin and derivation:
`../shared/data/ppl/wikitext2_raw/SOURCE.md` (source sha256 {wt_src}), itself split back into rows from the
blank-line-joined CRLF text of Deathnetworks/rotorquant:wikitext-test.txt@c5be50f038e68e35740efdf4c6f5d65d61c2485b.
WikiText (Merity et al. 2016, Salesforce): licence **CC BY-SA 3.0** (and GFDL); redistributed under the same licence.

## c4_validation_256.jsonl.gz

The first {n_c4} documents (row order of the file) of the data root's `calib/c4/c4_validation_2k.parquet`, column
`text` only, one `{{"text": ...}}` per line (`json.dumps(ensure_ascii=False)`). That parquet holds 2,000 C4-en
validation documents, copied from yxanul/yxanul_0.6B:validation/c4_validation_2k.parquet@d3ef06095f54f9e2a78c0abca1472a0188a5e1e9
(details in `../shared/data/calib/c4/SOURCE.md`; source sha256 {c4_src}). C4 (allenai/c4): licence **ODC-BY**.
Calibration drawn from this 256-document slice differs from calibration drawn from the full 2,000-document parquet
at the same seed, so a result row should record `pruning.data.calibration_source(dataset)`.

The .gz bytes depend on the zlib build (level 9); the decompressed sha256 is the stable identity.
"""


def build_assets(root: Path | None = None, out: Path = EMBEDDED) -> list[Path]:
    """Regenerate the embedded defaults from a data root; committed so the assets can be audited and rebuilt."""
    import pyarrow.parquet as pq

    root = Path(root) if root is not None else data_root()
    if root is None:
        raise DataError("build-assets needs a data root: set $PRUNING_DATA or pass --data-root")
    wt_src, c4_src = root / PPL_FILES[("wikitext2", "test")], root / CALIB_FILES["c4"]
    for p, what in ((wt_src, "wikitext2 test"), (c4_src, "c4 calibration")):
        if not p.is_file():
            raise DataError(f"build-assets: {what} file not found: {p}")
    out.mkdir(parents=True, exist_ok=True)

    wt_raw = wt_src.read_bytes()
    c4_docs = pq.read_table(c4_src, columns=["text"]).column("text").to_pylist()[:N_C4_EMBEDDED]
    c4_raw = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in c4_docs).encode("utf-8")

    rows, written = [], []
    for name, raw, src in (
        (PPL_EMBEDDED[("wikitext2", "test")], wt_raw, "ppl/wikitext2_raw/test.jsonl"),
        (CALIB_EMBEDDED["c4"], c4_raw, f"calib/c4/c4_validation_2k.parquet, rows 0-{N_C4_EMBEDDED - 1}, column text"),
    ):
        gz = _gzip_bytes(raw)
        (out / name).write_bytes(gz)
        written.append(out / name)
        rows.append(f"| {name} | {len(gz)} | {_sha256_bytes(gz)} | {_sha256_bytes(raw)} | {src} |")
    md = _SOURCE_MD.format(
        rows="\n".join(rows),
        wt_src=_sha256_bytes(wt_raw),
        c4_src=_sha256_bytes(c4_src.read_bytes()),
        n_c4=N_C4_EMBEDDED,
    )
    (out / "SOURCE.md").write_text(md, encoding="utf-8")
    written.append(out / "SOURCE.md")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruning.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-assets", help="rebuild pruning/assets/data from the data root")
    b.add_argument("--data-root", type=Path, default=None, help="default: the resolved data root")
    b.add_argument("--out", type=Path, default=EMBEDDED)
    args = parser.parse_args(argv)
    if args.cmd == "build-assets":
        for p in build_assets(args.data_root, args.out):
            print(f"{p}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
