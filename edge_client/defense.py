"""Input defenses on the edge, numpy only (the edge is torch-free): the twin of ``resilience.defenses``.

``EdgeDefense(encoder, "object_tv")`` is the paper's object-aware TV denoising as deployed: the edge runs its head
(onnxruntime) once on the incoming images, prices every quantized latent element with the codec's own CDF tables
(:meth:`codec.model.CodecModel.element_bits`; for MSHP with the same fixed-point scale indexes the encoder uses),
averages over channels, upsamples bilinearly to the image, min-max normalises per image, and runs masked TV
denoising with the same solver, energy, step sizes and defaults as the torch version, in float32: by default exact
TV in an opponent colour space by primal-dual iterations (luminance weight 0.015, chroma weight 0.35), or with
``solver="gd"`` the paper's gradient descent per RGB channel::

    E(u) = fidelity/2 * ||u - x||^2 + weight * sum mask * sqrt(dx^2 + dy^2 + tv_eps),   u <- clip(u - step*dE/du)

(see ``resilience.defenses`` for both energies and the measurements behind the defaults). The mask multiplies each
pixel's TV term: smoothing goes where bits are spent. Per-element costs are capped at 16 bits (the CDF precision,
the most an in-table symbol costs; escaped symbols, which cost more in the real stream, are priced at the cap too).
The torch version prices with the model's Gaussian at the coder's table scale (float means) and runs the head in
eager torch instead of ONNX Runtime; both move the mask only slightly, and both solvers are stable, so small mask
differences stay small in the output (see tests/test_resilience.py for the measured gap).

Other defenses: "tv" (mask = 1), "bit_depth", "median" (numpy, reflect padding), "gaussian", "jpeg" (Pillow),
"none". ``EdgeDefense.__call__`` takes uint8 NHWC or float NCHW [0, 1] images and returns float32 NCHW [0, 1].
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

TV_EPS = 1e-2
MAX_ELEMENT_BITS = 16.0
DEFAULT_SOLVER = "pd"  # the defense settings live here, shared by resilience.defenses (torch)
PD_WEIGHT = 0.015
PD_CHROMA_WEIGHT = 0.35
GD_WEIGHT = 0.1


def to_nchw_float(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1]; float NCHW is passed through (as float32)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 NHWC or float NCHW images with 3 channels, got {x.dtype} {x.shape}")
    return x


def resize_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, C, h, w] -> [N, C, H, W], bilinear with half-pixel centres (torch's ``align_corners=False``)."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0)

    h0, h1, fh = axis(m.shape[-2], size[0])
    w0, w1, fw = axis(m.shape[-1], size[1])
    fh, fw = fh[:, None], fw[None, :]
    top = m[..., h0, :][..., w0] * (1 - fw) + m[..., h0, :][..., w1] * fw
    bot = m[..., h1, :][..., w0] * (1 - fw) + m[..., h1, :][..., w1] * fw
    return (top * (1 - fh) + bot * fh).astype(m.dtype)


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation of [N, 1, H, W] to [0, 1]; a constant map becomes all ones (plain TV)."""
    flat = m.reshape(m.shape[0], -1)
    lo = flat.min(axis=1).reshape(-1, 1, 1, 1)
    span = (flat.max(axis=1) - flat.min(axis=1)).reshape(-1, 1, 1, 1)
    out = (m - lo) / np.maximum(span, 1e-12)
    return np.where(span > 1e-12, out, 1.0).astype(np.float32)


def _tv_terms(u: np.ndarray, tv_eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dx = np.zeros_like(u)
    dy = np.zeros_like(u)
    dx[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    dy[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    return dx, dy, np.sqrt(dx * dx + dy * dy + np.float32(tv_eps))


def total_variation(u: np.ndarray, mask: np.ndarray | float | None = None, tv_eps: float = TV_EPS) -> np.ndarray:
    """Per-image (masked) smoothed isotropic TV, [N]."""
    _, _, mag = _tv_terms(np.asarray(u, dtype=np.float32), tv_eps)
    if mask is not None:
        mag = mag * mask
    return mag.reshape(mag.shape[0], -1).sum(axis=1)


def tv_gradient(u: np.ndarray, mask: np.ndarray | float, tv_eps: float = TV_EPS) -> np.ndarray:
    """d/du of the masked TV (minus the divergence of the mask-weighted unit gradient field)."""
    dx, dy, mag = _tv_terms(u, tv_eps)
    w = mask / mag
    px, py = w * dx, w * dy
    g = -px - py
    g[..., :, 1:] += px[..., :, :-1]
    g[..., 1:, :] += py[..., :-1, :]
    return g


def masked_tv_denoise(x: np.ndarray, mask: np.ndarray | float = 1.0, weight: float = 0.1, step: float = 0.15,
                      iters: int = 100, fidelity: float = 1.0, tv_eps: float = TV_EPS) -> np.ndarray:
    """Projected gradient descent on fidelity/2*||u-x||^2 + weight*sum(mask*TV(u)) from u = x, float32 NCHW.

    The fidelity gradient uses the original input ``x`` (never an alias of the iterate: the reference bug)."""
    x = np.asarray(x, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)
    fid, wt, st = np.float32(fidelity), np.float32(weight), np.float32(step)
    u = x.copy()
    for _ in range(iters):
        grad = fid * (u - x) + wt * tv_gradient(u, m, tv_eps)
        u = np.clip(u - st * grad, 0.0, 1.0)
    return u


def _forward_diff(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dx = np.zeros_like(u)
    dy = np.zeros_like(u)
    dx[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    dy[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    return dx, dy


def _diff_adjoint(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    g = -px - py
    g[..., :, 1:] += px[..., :, :-1]
    g[..., 1:, :] += py[..., :-1, :]
    return g


OPPONENT = np.array([[1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
                     [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
                     [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]], dtype=np.float32)


def tv_settings(weight: float | None = None, chroma_weight: float | None = None, solver: str = DEFAULT_SOLVER,
                color: str | None = None) -> dict:
    """Effective TV settings, defaults filled in (identical rules to ``resilience.defenses.tv_settings``)."""
    if solver not in ("pd", "gd"):
        raise ValueError(f"solver must be 'pd' or 'gd', got {solver!r}")
    color = color or ("opponent" if solver == "pd" else "rgb")
    if color not in ("opponent", "rgb"):
        raise ValueError(f"color must be 'opponent' or 'rgb', got {color!r}")
    if solver == "gd" and (color != "rgb" or chroma_weight is not None):
        raise ValueError("the gd solver smooths each RGB channel with one weight (color='rgb', no chroma_weight)")
    if color == "rgb" and chroma_weight is not None:
        raise ValueError("chroma_weight applies to color='opponent' only")
    if weight is None:
        weight = PD_WEIGHT if solver == "pd" else GD_WEIGHT
    if color == "opponent" and chroma_weight is None:
        chroma_weight = PD_CHROMA_WEIGHT
    return {"solver": solver, "color": color, "weight": float(weight),
            "chroma_weight": None if chroma_weight is None else float(chroma_weight)}


def _mix(u: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.einsum("dc,nchw->ndhw", m, u).astype(np.float32, copy=False)


def masked_tv_primal_dual(x: np.ndarray, mask: np.ndarray | float = 1.0, weight: float = PD_WEIGHT,
                          iters: int = 100, fidelity: float = 1.0, chroma_weight: float | None = PD_CHROMA_WEIGHT,
                          color: str = "opponent") -> np.ndarray:
    """Exact masked TV (no smoothing) in opponent colours (or per RGB channel) by accelerated Chambolle-Pock
    iterations, float32 NCHW; the same formula, order and step sizes as
    ``resilience.defenses.masked_tv_primal_dual`` (see there for why)."""
    if fidelity <= 0:
        raise ValueError(f"the primal-dual solver needs fidelity > 0, got {fidelity}")
    x = np.asarray(x, dtype=np.float32)
    if color == "opponent":
        t: np.ndarray | None = OPPONENT
        cw = weight if chroma_weight is None else chroma_weight
        lam_c = np.array([weight, cw, cw], dtype=np.float32).reshape(1, 3, 1, 1)
    elif color == "rgb":
        t, lam_c = None, np.full((1, x.shape[1], 1, 1), weight, dtype=np.float32)
    else:
        raise ValueError(f"color must be 'opponent' or 'rgb', got {color!r}")
    lam = np.maximum(lam_c * np.asarray(mask, dtype=np.float32), np.float32(1e-12))
    tau = sigma = 1.0 / math.sqrt(8.0)
    u, ub = x.copy(), x.copy()
    px, py = np.zeros_like(x), np.zeros_like(x)
    for _ in range(iters):
        dx, dy = _forward_diff(ub if t is None else _mix(ub, t))
        px, py = px + np.float32(sigma) * dx, py + np.float32(sigma) * dy
        scale = np.maximum(np.sqrt(px * px + py * py) / lam, np.float32(1.0))
        px, py = px / scale, py / scale
        kt_p = _diff_adjoint(px, py) if t is None else _mix(_diff_adjoint(px, py), t.T)
        tf = np.float32(tau * fidelity)
        u_new = np.clip((u - np.float32(tau) * kt_p + tf * x) / (np.float32(1.0) + tf), 0.0, 1.0)
        theta = 1.0 / math.sqrt(1.0 + 2.0 * fidelity * tau)
        tau, sigma = tau * theta, sigma / theta
        ub = u_new + np.float32(theta) * (u_new - u)
        u = u_new
    return u.astype(np.float32, copy=False)


def masked_tv(x: np.ndarray, mask: np.ndarray | float = 1.0, weight: float | None = None, step: float = 0.15,
              iters: int = 100, fidelity: float = 1.0, tv_eps: float = TV_EPS, solver: str = DEFAULT_SOLVER,
              chroma_weight: float | None = None, color: str | None = None) -> np.ndarray:
    """Masked TV denoising by ``solver``: "pd" (exact TV in opponent colours, the default) or "gd" (the paper's
    gradient descent per RGB channel); defaults as ``tv_settings``."""
    st = tv_settings(weight, chroma_weight, solver, color)
    if st["solver"] == "pd":
        return masked_tv_primal_dual(x, mask, st["weight"], iters, fidelity, st["chroma_weight"], st["color"])
    return masked_tv_denoise(x, mask, st["weight"], step, iters, fidelity, tv_eps)


def bit_depth(x: np.ndarray, bits: int = 4) -> np.ndarray:
    levels = np.float32(2**int(bits) - 1)
    return (np.round(np.clip(x, 0, 1) * levels) / levels).astype(np.float32)


def median_filter(x: np.ndarray, size: int = 3) -> np.ndarray:
    """Per-channel median over size x size windows, reflect padding (scipy is not an edge dependency)."""
    if size % 2 != 1:
        raise ValueError(f"median size must be odd, got {size}")
    p = size // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
    win = np.lib.stride_tricks.sliding_window_view(xp, (size, size), axis=(2, 3))
    return np.median(win.reshape(*win.shape[:4], -1), axis=-1).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Separable Gaussian blur, radius ceil(3*sigma), reflect padding (same taps as the torch version)."""
    if sigma <= 0:
        return np.array(x, dtype=np.float32)
    r = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    xp = np.pad(np.asarray(x, dtype=np.float64), ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    out = np.lib.stride_tricks.sliding_window_view(xp, 2 * r + 1, axis=3) @ k
    out = np.lib.stride_tricks.sliding_window_view(out, 2 * r + 1, axis=2) @ k
    return out.astype(np.float32)


def jpeg_reencode(x: np.ndarray, quality: int = 75) -> np.ndarray:
    from PIL import Image

    arr = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    out = []
    for im in arr:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)


class EdgeDefense:
    """A defense run on the edge before encoding: ``EdgeDefense(encoder, name, **params)(images)``.

    ``encoder`` is an :class:`edge_client.runtime.EdgeEncoder` (its ONNX head and codec model price the latent for
    "object_tv"; other defenses do not use it and accept ``None``)."""

    NAMES = ("object_tv", "tv", "bit_depth", "median", "gaussian", "jpeg", "none")

    def __init__(self, encoder: Any, name: str = "object_tv", **params: Any) -> None:
        if name not in self.NAMES:
            raise ValueError(f"unknown edge defense {name!r}; known: {', '.join(self.NAMES)}")
        if name == "object_tv" and encoder is None:
            raise ValueError("object_tv needs the edge encoder (its head and codec price the latent)")
        if name in ("object_tv", "tv"):  # fail at construction, not on the first image
            tv_settings(**{k: params[k] for k in ("weight", "chroma_weight", "solver", "color") if k in params})
        self.encoder, self.name, self.params = encoder, name, params
        self._fn: Callable[[np.ndarray], np.ndarray] = {
            "object_tv": lambda x: masked_tv(x, self.mask(x), **params),
            "tv": lambda x: masked_tv(x, 1.0, **params),
            "bit_depth": lambda x: bit_depth(x, **params),
            "median": lambda x: median_filter(x, **params),
            "gaussian": lambda x: gaussian_blur(x, **params),
            "jpeg": lambda x: jpeg_reencode(x, **params),
            "none": lambda x: x.copy(),
        }[name]

    def mask(self, x: np.ndarray) -> np.ndarray:
        """Likelihood mask [N, 1, H, W] in [0, 1] of float NCHW images (one head pass, table-priced bits)."""
        y, z = self.encoder.head(x)
        codec = self.encoder.bundle.codec
        bits = np.stack([codec.element_bits(y[i], None if z is None else z[i]) for i in range(len(y))])
        m = np.minimum(bits, MAX_ELEMENT_BITS).mean(axis=1, keepdims=True).astype(np.float32)
        return normalize_map(resize_bilinear(m, x.shape[-2:]))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._fn(to_nchw_float(images))
