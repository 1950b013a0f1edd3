"""The codec model: everything needed to turn a latent into bytes and back, in numpy (no torch).

A :class:`CodecModel` is exported from a trained entropy model (``models.entropy``) and is the only coding path of
the project: evaluation, the edge client and the server all call :meth:`CodecModel.encode` /
:meth:`CodecModel.decode`. It holds the CDF tables, the medians of the factorized densities, and for MSHP the
fixed-point hyper-synthesis (``codec.hyper``) with its integer scale thresholds. Its :attr:`fingerprint` (SHA-256
over all of that) identifies it: edge and server compare fingerprints before any stream is decoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import hyper
from .ans import CdfTables, CodecError, LayerDecoder, encode_layers

FORMAT = "splitinfer-codec/1"


@dataclass
class Encoded:
    """One coded image: the byte string and the CRC-32 of its y scale indexes (MSHP; 0 for FP)."""

    data: bytes
    index_checksum: int
    symbols: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # what was coded (see quantize)


@dataclass
class CodecModel:
    prior: str  # "fp" | "mshp"
    latent_shape: tuple[int, int, int]  # y: C, H, W
    tables: dict[str, CdfTables]
    medians: dict[str, np.ndarray]  # per-channel medians of factorized densities ("y" for FP, "z" for MSHP)
    hyper_layers: list[hyper.FixedLayer] = field(default_factory=list)
    thresholds: np.ndarray | None = None
    hyper_shape: tuple[int, int, int] | None = None  # z: C, h, w (MSHP)

    # ----------------------------------------------------------------------------------------------- coding
    def _channel_indexes(self, shape: tuple[int, int, int]) -> np.ndarray:
        return np.broadcast_to(np.arange(shape[0]).reshape(-1, 1, 1), shape)

    def _y_params(self, z_symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.thresholds is not None
        z_hat = hyper.to_fixed(z_symbols) + hyper.to_fixed(self.medians["z"]).reshape(-1, 1, 1)
        params = hyper.synthesize(z_hat, self.hyper_layers)
        return hyper.indexes_and_means(params, self.thresholds, self.latent_shape)

    def quantize(self, y: np.ndarray, z: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Integer symbols (and the y indexes) the encoder will code; also what decoding must give back."""
        y = np.asarray(y, dtype=np.float32)
        if y.shape != self.latent_shape:
            raise CodecError(f"latent shape {y.shape} != model's {self.latent_shape}")
        if self.prior == "fp":
            sym = np.round(y - self.medians["y"].reshape(-1, 1, 1)).astype(np.int64)
            return {"y": sym, "y_idx": self._channel_indexes(self.latent_shape)}
        if z is None or z.shape != self.hyper_shape:
            raise CodecError(f"MSHP needs the hyper-latent z of shape {self.hyper_shape}")
        zs = np.round(np.asarray(z, dtype=np.float32) - self.medians["z"].reshape(-1, 1, 1)).astype(np.int64)
        idx, means = self._y_params(zs)
        ys = np.round(y.astype(np.float64) - means).astype(np.int64)
        return {"z": zs, "z_idx": self._channel_indexes(self.hyper_shape), "y": ys, "y_idx": idx, "means": means}

    def encode(self, y: np.ndarray, z: np.ndarray | None = None) -> Encoded:
        """Latent of one image (y [C,H,W], and z for MSHP) -> one ANS byte string."""
        q = self.quantize(y, z)
        layers = [(q["y"], q["y_idx"], self.tables["y"])]
        if self.prior == "mshp":
            layers.insert(0, (q["z"], q["z_idx"], self.tables["z"]))
            return Encoded(encode_layers(layers), hyper.index_checksum(q["y_idx"]), q)
        return Encoded(encode_layers(layers), 0, q)

    def decode(self, data: bytes, index_checksum: int | None = None) -> np.ndarray:
        """Bytes -> dequantized latent y_hat [C,H,W] float32. For MSHP, when ``index_checksum`` is given, the
        recomputed scale indexes must match it (else :class:`IndexMismatchError`, nothing is decoded from them)."""
        return self.decode_with_indexes(data, index_checksum)[0]

    def decode_with_indexes(self, data: bytes, index_checksum: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`decode`, also returning the CDF-table index of every y symbol."""
        dec = LayerDecoder(data)
        if self.prior == "fp":
            idx = self._channel_indexes(self.latent_shape)
            sym = dec.decode(idx, self.tables["y"]).reshape(self.latent_shape)
            y_hat = sym + self.medians["y"].reshape(-1, 1, 1).astype(np.float64)
        else:
            assert self.hyper_shape is not None
            zs = dec.decode(self._channel_indexes(self.hyper_shape), self.tables["z"]).reshape(self.hyper_shape)
            idx, means = self._y_params(zs)
            if index_checksum is not None and hyper.index_checksum(idx) != index_checksum:
                raise IndexMismatchError("scale indexes recomputed from z differ from the sender's (checksum "
                                         "mismatch): decoding y would give garbage")
            y_hat = dec.decode(idx, self.tables["y"]).reshape(self.latent_shape) + means
        if not dec.finished():
            raise CodecError("stream has trailing data after the last symbol")
        return y_hat.astype(np.float32), idx

    def dequantize(self, q: dict[str, np.ndarray]) -> np.ndarray:
        """What :meth:`decode` returns for the symbols of :meth:`quantize` (for lossless checks)."""
        if self.prior == "fp":
            return (q["y"] + self.medians["y"].reshape(-1, 1, 1).astype(np.float64)).astype(np.float32)
        return (q["y"] + q["means"]).astype(np.float32)

    # ------------------------------------------------------------------------------------------- bit accounting
    def element_bits(self, y: np.ndarray, z: np.ndarray | None = None, latent: str = "y") -> np.ndarray:
        """Cost in bits of every quantized element of one image's latent under the CDF tables, float64.

        Same symbols and table indexes as :meth:`encode` (for MSHP the fixed-point scale indexes from z), so it is
        what the coder pays up to the coder's own rounding. A symbol inside its table costs ``-log2 p`` of its bin
        (16-bit CDF); an escaped (out-of-table) one costs the escape bin plus the raw value exactly as
        :mod:`codec.ans` writes it: 5 bits of length (a 32-way uniform) and ``bit_length - 1`` bits of value.
        ``latent``: "y" ([C,H,W]) or, for MSHP, "z" (the side latent, [C,h,w]). Used by the edge defense's mask."""
        if latent not in ("y", "z") or (latent == "z" and self.prior != "mshp"):
            raise CodecError(f"latent must be 'y' (or 'z' for MSHP), got {latent!r} for prior {self.prior}")
        q = self.quantize(y, z)
        sym, idx, tables = q[latent], q[f"{latent}_idx"], self.tables[latent]
        idx = np.asarray(idx, dtype=np.int64)
        lengths = tables.lengths.astype(np.int64)[idx]
        rel = sym - tables.offsets.astype(np.int64)[idx]
        escape_bin = lengths - 2
        esc = (rel < 0) | (rel >= escape_bin)
        col = np.where(esc, escape_bin, rel)
        cdf = tables.cdf.astype(np.int64)
        counts = cdf[idx, col + 1] - cdf[idx, col]
        total = cdf[idx, lengths - 1].astype(np.float64)
        bits = -np.log2(np.maximum(counts, 1) / total)
        zigzag = np.where(sym >= 0, sym * 2, -sym * 2 - 1)
        raw = 5.0 + np.maximum(_bit_length(zigzag) - 1, 0)
        return np.where(esc, bits + raw, bits)

    # ---------------------------------------------------------------------------------------------- identity
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name, t in self.tables.items():
            arrays[f"table.{name}.cdf"] = t.cdf
            arrays[f"table.{name}.lengths"] = t.lengths
            arrays[f"table.{name}.offsets"] = t.offsets
        for name, m in self.medians.items():
            arrays[f"median.{name}"] = np.asarray(m, dtype=np.float32)
        for i, layer in enumerate(self.hyper_layers):
            arrays[f"hyper.{i}.weight"] = layer.weight
            arrays[f"hyper.{i}.bias"] = layer.bias
        if self.thresholds is not None:
            arrays["thresholds"] = self.thresholds
        return arrays

    def _meta(self) -> dict:
        return {"format": FORMAT, "prior": self.prior, "latent_shape": list(self.latent_shape),
                "hyper_shape": list(self.hyper_shape) if self.hyper_shape else None, "act_bits": hyper.ACT_BITS,
                "hyper_layers": [{"frac": lyr.frac, "stride": lyr.stride, "padding": lyr.padding,
                                  "output_padding": lyr.output_padding, "transposed": lyr.transposed,
                                  "leaky": lyr.leaky} for lyr in self.hyper_layers]}

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for name, arr in sorted(self._arrays().items()):
            h.update(name.encode())
            h.update(str(arr.dtype).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """One .npz file (written atomically): arrays plus the metadata as JSON."""
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.frombuffer(json.dumps(self._meta()).encode(), dtype=np.uint8), **self._arrays())
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CodecModel:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise CodecError(f"{path}: not a codec model file ({exc})") from exc
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        if meta.get("format") != FORMAT:
            raise CodecError(f"{path}: unknown codec format {meta.get('format')!r}")
        if meta.get("act_bits") != hyper.ACT_BITS:
            raise CodecError(f"{path}: written with act_bits={meta.get('act_bits')}, this codec uses {hyper.ACT_BITS}")
        tables = {name: CdfTables(arrays[f"table.{name}.cdf"], arrays[f"table.{name}.lengths"],
                                  arrays[f"table.{name}.offsets"])
                  for name in {k.split(".")[1] for k in arrays if k.startswith("table.")}}
        medians = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("median.")}
        layers = [hyper.FixedLayer(arrays[f"hyper.{i}.weight"], arrays[f"hyper.{i}.bias"], **spec)
                  for i, spec in enumerate(meta["hyper_layers"])]
        return cls(meta["prior"], tuple(meta["latent_shape"]), tables, medians, layers, arrays.get("thresholds"),
                   tuple(meta["hyper_shape"]) if meta["hyper_shape"] else None)


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Elementwise ``int.bit_length`` of non-negative int64 values (0 -> 0), exact (no float log)."""
    v = np.asarray(v, dtype=np.int64)
    n = np.zeros(v.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << shift)
        n += np.where(big, shift, 0)
        v = np.where(big, v >> shift, v)
    return n + (v > 0)


class IndexMismatchError(CodecError):
    """Edge and server derived different CDF-table indexes: the stream must not be decoded."""
