"""The per-window / per-document packing: every bit survives the round trip through the record JSON."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest

from experiments import persample as S


def test_floats_round_trip_bit_exact_through_json():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(300.0, 40.0, 2500), [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, np.finfo(np.float64).max, 1 / 3]]
    )
    text = json.loads(json.dumps({"x": S.pack_floats(values)}))["x"]
    back = S.unpack_floats(text)
    assert back.dtype == np.float64 and back.flags.writeable
    assert back.tobytes() == values.astype(np.float64).tobytes()  # bit for bit, NaN and -0.0 included
    assert len(text) == 4 * -(-8 * len(values) // 3)  # base64 of 8 bytes per value
    # the documented layout, decoded without the module: little-endian float64
    assert struct.unpack("<3d", base64.b64decode(S.pack_floats([1.5, -2.0, 1e300]))) == (1.5, -2.0, 1e300)
    assert S.unpack_floats(S.pack_floats([])).size == 0


def test_counts_and_bits_round_trip():
    counts = [127, 128, 48, 0, 2**32 - 1]
    assert S.unpack_counts(S.pack_counts(counts)).tolist() == counts
    assert struct.unpack("<2I", base64.b64decode(S.pack_counts([1, 2]))) == (1, 2)
    bits = [1.0, 0.0, True, False, 1, 0, np.float64(1.0)]
    assert S.pack_bits(bits) == "1010101"
    assert S.unpack_bits("1010101").tolist() == [True, False, True, False, True, False, True]
    assert S.unpack_bits("").size == 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: S.pack_counts([1, -1]), "integers in"),
        (lambda: S.pack_counts([2**32]), "integers in"),
        (lambda: S.pack_counts([1.5]), "integers in"),
        (lambda: S.pack_bits([1.0, 0.5]), "0 or 1"),
        (lambda: S.pack_bits([float("nan")]), "0 or 1"),
        (lambda: S.unpack_bits("10x1"), "only '0' and '1'"),
        (lambda: S.unpack_floats("not base64!"), "not valid base64"),
        (lambda: S.unpack_floats(base64.b64encode(b"1234567").decode()), "whole number of 8-byte"),
        (lambda: S.window_block([1.0, 2.0], [3], "h"), "2 window NLL sums but 1"),
        (lambda: S.doc_block({"acc": [1, 0], "acc_norm": [1]}, "h"), "differ in length"),
    ],
)
def test_bad_values_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_record_blocks_read_back_and_check_totals():
    entry = {
        "ppl": 0.0,
        "n_windows": 3,
        "n_tokens_scored": 127 + 48 + 48,
        "per_window": S.window_block([10.5, 4.25, 3.0], [127, 48, 48], S.digest([b"ids"])),
    }
    entry = json.loads(json.dumps(entry))
    nll, tokens = S.window_values(entry)
    assert nll.tolist() == [10.5, 4.25, 3.0] and tokens.tolist() == [127, 48, 48]
    assert set(entry["per_window"]) == {"nll_sum", "n_tokens", "windows", "encoding"}
    with pytest.raises(ValueError, match="n_windows=4"):
        S.window_values({**entry, "n_windows": 4})
    with pytest.raises(ValueError, match="n_tokens_scored=224"):
        S.window_values({**entry, "n_tokens_scored": 224})
    with pytest.raises(S.MissingPerSample, match="re-run the cell"):
        S.window_values({"ppl": 3.0})

    row = json.loads(json.dumps({"n_docs": 4, "per_doc": S.doc_block({"acc": [1, 0, 0, 1]}, S.digest(["a", "b"]))}))
    assert S.doc_values(row, "acc").tolist() == [True, False, False, True]
    with pytest.raises(S.MissingPerSample, match=r"no 'acc_norm'.*stored: \['acc'\]"):
        S.doc_values(row, "acc_norm")
    with pytest.raises(ValueError, match="n_docs=5"):
        S.doc_values({**row, "n_docs": 5}, "acc")
    assert S.digest(["a", "b"]) != S.digest(["ab"]) and len(S.digest([])) == 16
