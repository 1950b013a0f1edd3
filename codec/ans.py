"""Entropy coding of integer latents with constriction's ANS coder (memory-safe Rust; numpy API; no torch).

Why constriction and not compressai's rANS: compressai's C++ decoder reads out of bounds on hostile or truncated
strings and crashes on empty inputs (measured, see DESIGN.md §3). constriction checks its inputs and is faster.

Model: a *layer* is a flat int array of symbols plus, for every symbol, the index of the CDF table that codes it
(channel index for a factorized prior, scale index for a Gaussian conditional). Tables are compressai-style
quantized CDFs (``cdf[t, :length[t]]``, 16-bit precision, last bin = escape). A symbol whose table-relative value
``q = symbol - offset[t]`` falls outside ``[0, length[t] - 2)`` is coded as the escape bin followed by its raw value
(zig-zag, bit length + bits, with uniform models), so coding is lossless for any integer input.

All layers of one image go into **one** ANS stream in decoding order (e.g. hyper-latent ``z`` first, then ``y``,
whose table indexes depend on ``z``): one stream saves one flush of coder state per image. Within a layer symbols
are grouped by table (ascending table index, original order inside a group); the decoder rebuilds the groups from
the same indexes.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

_MAX_ABS_SYMBOL = 1 << 30


@dataclass(frozen=True)
class CdfTables:
    """compressai-style quantized CDF tables: ``cdf`` [T, Lmax] int32, ``lengths`` [T], ``offsets`` [T]."""

    cdf: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.cdf.ndim != 2 or self.lengths.shape != (self.cdf.shape[0],) or self.offsets.shape != self.lengths.shape:
            raise ValueError("CdfTables: cdf must be [T, L] and lengths/offsets [T]")
        if (self.lengths < 3).any() or (self.lengths > self.cdf.shape[1]).any():
            raise ValueError("CdfTables: every table needs 3..L cdf entries")

    @property
    def num_tables(self) -> int:
        return int(self.cdf.shape[0])

    def probabilities(self, t: int) -> np.ndarray:
        """Bin probabilities of table ``t`` (escape bin last), as float64 from the exact integer CDF."""
        return np.diff(self.cdf[t, : self.lengths[t]]).astype(np.float64)


class CodecError(ValueError):
    """Data that cannot be coded or decoded (bad shapes, bad indexes, corrupt stream)."""


def _model(tables: CdfTables, t: int, cache: dict) -> object:
    key = (id(tables), t)
    m = cache.get(key)
    if m is None:
        m = constriction.stream.model.Categorical(tables.probabilities(t), perfect=False)
        cache[key] = m
    return m


def _groups(indexes: np.ndarray, num_tables: int) -> list[tuple[int, np.ndarray]]:
    if indexes.size and (indexes.min() < 0 or indexes.max() >= num_tables):
        raise CodecError(f"table index out of range [0, {num_tables})")
    order = np.argsort(indexes, kind="stable")
    counts = np.bincount(indexes, minlength=num_tables)
    out, start = [], 0
    for t in np.flatnonzero(counts):
        out.append((int(t), order[start:start + counts[t]]))
        start += counts[t]
    return out


def _push_raw(coder: object, value: int) -> None:
    """Push one escaped raw value (pieces pushed in reverse of their decoding order)."""
    u = (value << 1) if value >= 0 else ((-value << 1) - 1)
    n = int(u).bit_length()  # 0..31
    pieces: list[tuple[int, int]] = [(n, 32)]
    rest, bits = u, n - 1
    while bits > 0:
        k = min(16, bits)
        bits -= k
        pieces.append(((rest >> bits) & ((1 << k) - 1), 1 << k))
    for sym, size in reversed(pieces):
        coder.encode_reverse(int(sym), constriction.stream.model.Uniform(size))


def _pop_raw(coder: object) -> int:
    n = int(coder.decode(constriction.stream.model.Uniform(32)))
    if n == 0:
        return 0
    u, bits = 1, n - 1
    while bits > 0:
        k = min(16, bits)
        bits -= k
        u = (u << k) | int(coder.decode(constriction.stream.model.Uniform(1 << k)))
    return (u >> 1) if u % 2 == 0 else -((u + 1) >> 1)


def encode_layers(layers: list[tuple[np.ndarray, np.ndarray, CdfTables]]) -> bytes:
    """Code layers ``(symbols, indexes, tables)`` (in decoding order) into one byte string."""
    coder = constriction.stream.stack.AnsCoder()
    cache: dict = {}
    for symbols, indexes, tables in reversed(layers):
        symbols = np.asarray(symbols).reshape(-1).astype(np.int64)
        indexes = np.asarray(indexes).reshape(-1).astype(np.int64)
        if symbols.shape != indexes.shape:
            raise CodecError("symbols and indexes differ in size")
        if symbols.size and np.abs(symbols).max() >= _MAX_ABS_SYMBOL:
            raise CodecError(f"symbol magnitude >= 2^30 cannot be coded (got {np.abs(symbols).max()})")
        for t, pos in reversed(_groups(indexes, tables.num_tables)):
            q = symbols[pos] - int(tables.offsets[t])
            escape_bin = int(tables.lengths[t]) - 2
            esc = (q < 0) | (q >= escape_bin)
            for value in reversed(symbols[pos][esc].tolist()):
                _push_raw(coder, int(value))
            q = np.where(esc, escape_bin, q).astype(np.int32)
            coder.encode_reverse(q, _model(tables, t, cache))
    return coder.get_compressed().tobytes()


class LayerDecoder:
    """Pops layers off one stream in order; the caller supplies each layer's indexes (which may depend on the
    layers decoded before it)."""

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise CodecError(f"stream length {len(data)} is not a multiple of 4 bytes")
        words = np.frombuffer(data, dtype=np.uint32).copy()
        if words.size and words[-1] == 0:
            raise CodecError("stream does not end in a valid coder state")
        try:
            self._coder = constriction.stream.stack.AnsCoder(words)
        except Exception as exc:  # constriction reports malformed input as Python exceptions of several types
            raise CodecError(f"malformed stream ({exc})") from exc
        self._cache: dict = {}

    def decode(self, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        """Decode one layer; any failure of the coder on malformed data surfaces as CodecError."""
        try:
            return self._decode(indexes, tables)
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"malformed stream ({type(exc).__name__}: {exc})") from exc

    def _decode(self, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        indexes = np.asarray(indexes).reshape(-1).astype(np.int64)
        out = np.empty(indexes.size, dtype=np.int64)
        for t, pos in _groups(indexes, tables.num_tables):
            q = np.asarray(self._coder.decode(_model(tables, t, self._cache), pos.size), dtype=np.int64)
            escape_bin = int(tables.lengths[t]) - 2
            vals = q + int(tables.offsets[t])
            for j in np.flatnonzero(q == escape_bin).tolist():
                vals[j] = _pop_raw(self._coder)
            out[pos] = vals
        return out

    def finished(self) -> bool:
        """True when every word was consumed (a well-formed stream leaves nothing behind)."""
        return bool(self._coder.is_empty())
