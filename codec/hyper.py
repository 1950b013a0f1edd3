"""Bit-exact hyper-synthesis (``h_s``) for the mean-scale hyperprior, in fixed point, numpy only.

Why: each element of ``y`` is coded with the CDF table picked by thresholding its predicted scale, and table
entries are ~13% apart. Float ``h_s`` differs between runtimes (ONNX Runtime vs torch, 1 vs 2 threads, TF32 on GPU:
measured ~2 index mismatches per million), and one mismatched index silently corrupts the rest of the stream.

How: weights are quantized to integers (per-layer power-of-two scale, |w| < 2^15), activations carry ``ACT_BITS``
fractional bits and are saturated to |a| < 2^21, so every product is < 2^36 and every convolution sum (at most a
few thousand terms) stays far below 2^53. Integer-valued float64 arithmetic below 2^53 is exact whatever the
summation order, so a BLAS matmul gives the same bits on every machine, thread count and library. Requantization
divides by powers of two and floors (exact too). Scale indexes come from integer thresholds; means are exact
multiples of 2^-ACT_BITS. Edge and server run this same function, so their indexes are identical by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACT_BITS = 10
ACT_LIMIT = float(2**21)
WEIGHT_LIMIT = 2**15 - 1
LEAKY_NUM, LEAKY_DEN = 41, 4096  # LeakyReLU slope 0.01 as an exact dyadic fraction (0.01001)


@dataclass(frozen=True)
class FixedLayer:
    """One conv or transposed conv: integer weights [out, in, k, k] with ``2^-frac`` scale, integer bias."""

    weight: np.ndarray  # float64 holding integers
    bias: np.ndarray  # float64 holding integers, at ACT_BITS + frac fractional bits
    frac: int
    stride: int
    padding: int
    output_padding: int
    transposed: bool
    leaky: bool  # LeakyReLU after this layer


def quantize_layer(weight: np.ndarray, bias: np.ndarray, *, stride: int, padding: int, output_padding: int = 0,
                   transposed: bool, leaky: bool) -> FixedLayer:
    """Float weights (torch layout: conv [out,in,k,k], transposed conv [in,out,k,k]) -> FixedLayer."""
    w = np.asarray(weight, dtype=np.float64)
    if transposed:  # transposed conv == conv over the zero-stuffed input with the flipped, in/out-swapped kernel
        w = np.flip(w, axis=(2, 3)).transpose(1, 0, 2, 3)
    peak = float(np.abs(w).max()) or 1.0
    frac = int(np.floor(np.log2(WEIGHT_LIMIT / peak)))
    wq = np.round(w * 2.0**frac)
    bq = np.round(np.asarray(bias, dtype=np.float64) * 2.0 ** (frac + ACT_BITS))
    return FixedLayer(np.ascontiguousarray(wq), bq, frac, stride, padding, output_padding, transposed, leaky)


def _conv(x: np.ndarray, layer: FixedLayer) -> np.ndarray:
    """Exact integer convolution of x [C, H, W] (float64 integers) -> [O, H', W'] at ACT_BITS + frac bits."""
    k = layer.weight.shape[-1]
    if layer.transposed:
        c, h, w = x.shape
        s = layer.stride
        up = np.zeros((c, (h - 1) * s + 1, (w - 1) * s + 1))
        up[:, ::s, ::s] = x
        lo, hi = k - 1 - layer.padding, k - 1 - layer.padding + layer.output_padding
        x = np.pad(up, ((0, 0), (lo, hi), (lo, hi)))
        stride = 1
    else:
        p = layer.padding
        x = np.pad(x, ((0, 0), (p, p), (p, p)))
        stride = layer.stride
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    # win: [C, H', W', k, k] -> [H'*W', C*k*k] @ [C*k*k, O]
    cols = win.transpose(1, 2, 0, 3, 4).reshape(win.shape[1] * win.shape[2], -1)
    out = cols @ layer.weight.reshape(layer.weight.shape[0], -1).T
    out = out.T.reshape(layer.weight.shape[0], win.shape[1], win.shape[2])
    return out + layer.bias[:, None, None]


def synthesize(z_hat_fixed: np.ndarray, layers: list[FixedLayer]) -> np.ndarray:
    """Fixed-point h_s: z_hat (integers at ACT_BITS fractional bits, [C, h, w]) -> output at ACT_BITS bits."""
    a = np.asarray(z_hat_fixed, dtype=np.float64)
    for layer in layers:
        acc = _conv(a, layer)
        a = np.floor((acc + 2.0 ** (layer.frac - 1)) / 2.0**layer.frac)  # round to ACT_BITS fractional bits
        if layer.leaky:
            a = np.where(a >= 0, a, np.floor(a * LEAKY_NUM / LEAKY_DEN))
        a = np.clip(a, -ACT_LIMIT, ACT_LIMIT)
    return a


def to_fixed(x: np.ndarray) -> np.ndarray:
    """Float values -> integers at ACT_BITS fractional bits (for z_hat = symbols + medians)."""
    return np.round(np.asarray(x, dtype=np.float64) * 2.0**ACT_BITS)


def scale_thresholds(scale_table: list[float] | np.ndarray) -> np.ndarray:
    """Integer thresholds t_k with ``scale <= s_k  <=>  scale_fixed <= t_k`` (scale_fixed at ACT_BITS bits)."""
    return np.floor(np.asarray(scale_table, dtype=np.float64) * 2.0**ACT_BITS)


def indexes_and_means(params_fixed: np.ndarray, thresholds: np.ndarray, latent_shape: tuple[int, int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Split h_s output into scales and means (cropped to the latent), map scales to table indexes like compressai's
    ``GaussianConditional.build_indexes`` (index = number of table entries strictly below the scale, at most
    len-1), and return means as float64 (exact multiples of 2^-ACT_BITS)."""
    c, h, w = latent_shape
    p = params_fixed[:, :h, :w]
    if p.shape != (2 * c, h, w):
        raise ValueError(f"h_s output {p.shape} does not cover latent {latent_shape}")
    scales, means = p[:c], p[c:]
    # count of thresholds[:-1] strictly below the scale == compressai's (L-1) - #{k < L-1: scale <= s_k}
    idx = np.searchsorted(thresholds[:-1], scales, side="left").astype(np.int64)
    return idx, means / 2.0**ACT_BITS


def index_checksum(indexes: np.ndarray) -> int:
    """CRC-32 of the int32 index tensor: sent by the edge, recomputed by the server before decoding y."""
    import zlib

    return zlib.crc32(np.ascontiguousarray(indexes, dtype="<i4").tobytes())
