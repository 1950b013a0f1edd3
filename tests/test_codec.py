"""The torch-free ANS codec: lossless for any integers, escapes, several layers in one stream, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from codec.ans import CdfTables, CodecError, LayerDecoder, encode_layers


def _tables(num: int = 4, bins: int = 6, seed: int = 0) -> CdfTables:
    rng = np.random.default_rng(seed)
    cdf = np.zeros((num, bins + 2), np.int32)
    for t in range(num):
        c = np.concatenate([[0], np.cumsum(rng.integers(1, 100, bins + 1))])
        cdf[t] = (c * 65536) // c[-1]
    return CdfTables(cdf, np.full(num, bins + 2, np.int32), np.array([-2, -3, 0, 1][:num], np.int32))


def test_round_trip_with_escapes_and_two_layers() -> None:
    tab = _tables()
    rng = np.random.default_rng(1)
    s1 = rng.integers(-5, 8, 1000)
    s1[[3, 10, 999]] = [123456, -(2**29), 2**29]
    i1 = rng.integers(0, 4, 1000)
    s2 = rng.integers(-3, 3, 77)
    i2 = rng.integers(0, 2, 77)
    data = encode_layers([(s1, i1, tab), (s2, i2, tab)])
    dec = LayerDecoder(data)
    assert np.array_equal(dec.decode(i1, tab), s1)
    assert np.array_equal(dec.decode(i2, tab), s2)
    assert dec.finished()


def test_skewed_symbols_code_below_raw_size() -> None:
    tab = _tables()
    sym = np.zeros(5000, np.int64)  # offset -2 -> bin 2 for table 0
    data = encode_layers([(sym, np.zeros(5000, np.int64), tab)])
    assert 0 < len(data) < 5000 // 2


def test_empty_layer_round_trips() -> None:
    tab = _tables()
    data = encode_layers([(np.zeros(0, np.int64), np.zeros(0, np.int64), tab)])
    assert np.array_equal(LayerDecoder(data).decode(np.zeros(0, np.int64), tab), np.zeros(0))


@pytest.mark.parametrize("bad", [
    dict(idx=4), dict(idx=-1), dict(sym=2**31), dict(size_mismatch=True),
])
def test_bad_inputs_raise_codec_error(bad: dict) -> None:
    tab = _tables()
    sym = np.zeros(10, np.int64)
    idx = np.zeros(10, np.int64)
    if "idx" in bad:
        idx[3] = bad["idx"]
    if "sym" in bad:
        sym[0] = bad["sym"]
    if "size_mismatch" in bad:
        idx = idx[:5]
    with pytest.raises(CodecError):
        encode_layers([(sym, idx, tab)])


def test_stream_with_bad_length_is_rejected() -> None:
    with pytest.raises(CodecError, match="multiple of 4"):
        LayerDecoder(b"\x01\x02\x03")


def test_malformed_tables_are_rejected() -> None:
    with pytest.raises(ValueError):
        CdfTables(np.zeros((2, 4), np.int32), np.array([2, 4], np.int32), np.zeros(2, np.int32))
