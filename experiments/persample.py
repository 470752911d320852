"""Per-window PPL and per-document zero-shot results, packed compactly into the record JSON.

Why: an interval or a paired test needs the units a number averages over (METHODS.md §1.4 windows, §1.5
documents), and a record must carry them so uncertainty is computed from the store, never by re-running a model.

The one format, written by the eval (``pruning.eval``) and read by ``experiments.uncertainty``:

- a PPL entry gains ``"per_window": {"nll_sum": F, "n_tokens": C, "windows": H, "encoding": ...}``: ``F`` is
  base64 of the little-endian float64 NLL sum of each window (in window order), ``C`` base64 of the little-endian
  uint32 count of scored tokens of each window (the first window scores more when windows overlap), ``H`` a
  digest of the windows' token ids, so two entries are paired only when they scored the very same tokens;
- a zero-shot task row gains ``"per_doc": {"acc": B, "acc_norm": B, "docs": H}``: ``B`` is one character per
  document in lm-eval's ``doc_id`` order, ``"1"`` = correct (acc_norm absent for tasks lm-eval scores with acc
  only), ``H`` a digest of lm-eval's per-document hashes.

Everything is a string, so no table, store column or W&B summary picks these up as metrics. The module needs
only numpy (the tables layer and a dashboard read records without importing torch).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

WINDOW_ENCODING = "base64 little-endian: nll_sum float64, n_tokens uint32"
_UINT32_MAX = 2**32 - 1


# ---------------------------------------------------------------------------------------------------------------
# Arrays <-> strings


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, itemsize: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not valid base64 ({exc})") from None
    if len(raw) % itemsize:
        raise ValueError(f"{what}: {len(raw)} bytes is not a whole number of {itemsize}-byte values")
    return raw


def pack_floats(values: Sequence[float]) -> str:
    """base64 of little-endian float64: exact (every bit kept), 8 bytes per value before base64."""
    return _b64(np.asarray(values, dtype="<f8").tobytes())


def unpack_floats(text: str) -> np.ndarray:
    return np.frombuffer(_unb64(text, 8, "float64 array"), dtype="<f8").astype(np.float64)


def pack_counts(values: Sequence[int]) -> str:
    """base64 of little-endian uint32; refuses anything that is not an integer in [0, 2**32)."""
    arr = np.asarray(values)
    if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > _UINT32_MAX):
        raise ValueError(
            f"counts must be integers in [0, 2**32), got dtype {arr.dtype} range [{arr.min()}, {arr.max()}]"
        )
    return _b64(arr.astype("<u4").tobytes())


def unpack_counts(text: str) -> np.ndarray:
    return np.frombuffer(_unb64(text, 4, "uint32 array"), dtype="<u4").astype(np.int64)


def pack_bits(values: Iterable[float | bool]) -> str:
    """One character per value, "1" = correct; only 0/1 (bool, int or float) is accepted."""
    out = []
    for v in values:
        if v not in (0, 1):  # True == 1, 1.0 == 1; 0.5 or NaN is not a correctness
            raise ValueError(f"a per-document correctness must be 0 or 1, got {v!r}")
        out.append("1" if v else "0")
    return "".join(out)


def unpack_bits(text: str) -> np.ndarray:
    if not isinstance(text, str) or text.strip("01"):
        raise ValueError(f"a per-document bit string holds only '0' and '1', got {str(text)[:40]!r}")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def digest(parts: Iterable[bytes | str]) -> str:
    """Short content digest (16 hex) of a sequence of parts, used to check two records share their units."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Record blocks


def window_block(nll_sums: Sequence[float], n_tokens: Sequence[int], windows: str) -> dict[str, str]:
    """The ``per_window`` block of a PPL entry; ``windows`` is a digest of the scored token ids."""
    if len(nll_sums) != len(n_tokens):
        raise ValueError(f"{len(nll_sums)} window NLL sums but {len(n_tokens)} window token counts")
    return {
        "nll_sum": pack_floats(nll_sums),
        "n_tokens": pack_counts(n_tokens),
        "windows": windows,
        "encoding": WINDOW_ENCODING,
    }


def doc_block(correct: Mapping[str, Sequence[float | bool]], docs: str) -> dict[str, str]:
    """The ``per_doc`` block of a zero-shot task row: a bit string per metric, plus the documents' digest."""
    lengths = {m: len(v) for m, v in correct.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-document metrics of one task differ in length: {lengths}")
    return {**{m: pack_bits(v) for m, v in correct.items()}, "docs": docs}


class MissingPerSample(KeyError):
    """The record was written before per-window/per-document results were stored (re-run the cell)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no per-sample results"


def window_values(entry: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, scored tokens) per window of one PPL entry, checked against the entry's own totals."""
    block = entry.get("per_window") if isinstance(entry, Mapping) else None
    if not isinstance(block, Mapping):
        raise MissingPerSample(
            "this PPL entry has no per_window block (written before per-window storage; "
            "re-run the cell with force=true)"
        )
    nll, tokens = unpack_floats(block["nll_sum"]), unpack_counts(block["n_tokens"])
    if len(nll) != len(tokens):
        raise ValueError(f"per_window: {len(nll)} NLL sums but {len(tokens)} token counts")
    n_windows, n_scored = entry.get("n_windows"), entry.get("n_tokens_scored")
    if n_windows is not None and len(nll) != n_windows:
        raise ValueError(f"per_window holds {len(nll)} windows but the entry says n_windows={n_windows}")
    if n_scored is not None and int(tokens.sum()) != n_scored:
        raise ValueError(f"per_window counts {int(tokens.sum())} tokens but the entry says n_tokens_scored={n_scored}")
    return nll, tokens


def doc_values(row: Mapping, metric: str) -> np.ndarray:
    """Per-document correctness (bool, doc_id order) of one zero-shot task row for ``acc`` or ``acc_norm``."""
    block = row.get("per_doc") if isinstance(row, Mapping) else None
    if not isinstance(block, Mapping):
        raise MissingPerSample(
            "this zero-shot row has no per_doc block (written before per-document storage; "
            "re-run the cell with force=true)"
        )
    if metric not in block:
        have = sorted(k for k in block if k != "docs")
        raise MissingPerSample(f"per_doc has no {metric!r} (lm-eval does not score this task with it); stored: {have}")
    bits = unpack_bits(block[metric])
    n_docs = row.get("n_docs")
    if n_docs is not None and len(bits) != n_docs:
        raise ValueError(f"per_doc {metric} holds {len(bits)} documents but the row says n_docs={n_docs}")
    return bits
