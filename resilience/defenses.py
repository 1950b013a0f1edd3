"""Input defenses against entropy attacks, in torch (the torch-free edge twin is ``edge_client.defense``).

The paper's defense is *object-aware total-variation denoising*: compute the latent likelihood map of the (possibly
attacked) input, average it over channels, upsample it to the image and use it as a spatial mask; then run masked TV
denoising with a fidelity term to the input, and encode the result. An attack adds high-frequency energy that the
entropy model pays for in bits; TV removes such energy, and the mask spends the smoothing where bits are spent.

How the mask enters (a choice, documented here and in the edge twin): the TV term of every pixel is multiplied by the
mask in [0, 1], so pixels whose latent cells cost the most bits (mask ~1) get the full regularisation ``weight`` and
the cheapest ones (mask ~0) are only held by the fidelity term, i.e. left as they are. Energy minimised::

    E(u) = fidelity/2 * ||u - x||^2 + weight * sum_{c,i,j} mask_ij * sqrt(dx_cij^2 + dy_cij^2 + tv_eps)

(forward differences, zero across the last row/column; isotropic per colour channel), by projected gradient
descent from u = x: ``u <- clip(u - step * dE/du, 0, 1)``. The gradient is written out analytically (not autograd)
so that the numpy edge version computes exactly the same formula. Unlike the reference code, the fidelity term is
live: its gradient ``fidelity * (u - x)`` uses the *original* input, not an alias of the iterate.

Why ``tv_eps = 1e-2`` (not the 1e-6 of textbook smoothed TV): the energy's gradient is Lipschitz with constant
``L <= fidelity + 8 * weight / sqrt(tv_eps)``, and gradient descent is stable only for ``step * L < 2``. With the
paper's weight 0.1 and step 0.15, tv_eps = 1e-6 gives step * L ~ 120: the iterate oscillates by up to ~step*weight
per pixel and tiny input differences are amplified (measured: numpy vs torch with the *same* mask differ by up to
7/255, and a 2% mask change moves pixels by 12/255). tv_eps = 1e-2 gives step * L = 1.35: the iteration converges,
differences stay proportional (2% mask change -> < 1/255), at the price of a milder defense (ε = 8/255 entropy attack
on the MSHP model: 317 -> 289 B/image real, against -> 282 B at 1e-6). Differences below ~0.1 in intensity are smoothed
quadratically (Huber-like), larger edges in TV fashion. Pass ``tv_eps`` to change it.

All functions take and return float NCHW tensors in [0, 1]; they never need gradients (attacks use BPDA).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from codec.model import CodecModel

from .attacks import frozen_eval, latent_bits

TV_EPS = 1e-2
MAX_ELEMENT_BITS = 16.0  # the coder's CDF precision: the most an in-table symbol can cost (both masks cap here)


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of [N, 1, H, W] to [0, 1]; a constant map becomes all ones (plain TV)."""
    lo = m.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    hi = m.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    span = hi - lo
    out = (m - lo) / span.clamp_min(1e-12)
    return torch.where(span > 1e-12, out, torch.ones_like(out))


def _codec_bits(model: nn.Module, x: torch.Tensor, codec: CodecModel | None) -> torch.Tensor:
    codec = codec or model.codec_model()
    y = model.encode_latent(x)
    z = model.entropy.side_latent(y)
    bits = [codec.element_bits(y[i].cpu().numpy(), None if z is None else z[i].cpu().numpy()) for i in range(len(y))]
    return torch.from_numpy(np.stack(bits)).to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def likelihood_mask(model: nn.Module, x: torch.Tensor, pricing: str = "model", codec: CodecModel | None = None
                    ) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1]: ``-log2 p`` of each *quantized* y element, averaged over channels, bilinearly
    upsampled to the image size (align_corners=False), min-max normalised per image. For MSHP only y counts (z is
    a 16x smaller side grid). Every element's cost is capped at 16 bits (the CDF precision: no in-table symbol
    costs more; escaped symbols are priced at the cap as well).

    ``pricing="model"`` (torch only, fast enough for attack loops): the model's density at the rounded latent, with
    MSHP scales snapped to the scale-table entry the coder uses. ``pricing="codec"``: the codec's own tables and
    fixed-point scale indexes and means (:meth:`CodecModel.element_bits`, numpy), i.e. exactly what the torch-free
    edge computes (pass ``codec`` to skip rebuilding it, ~0.2 s). They differ where float and fixed-point means put
    ``y - mean`` on different sides of a rounding boundary: rare, but one such symbol can cost up to 16 bits more."""
    with frozen_eval(model):
        if pricing == "codec":
            bits = _codec_bits(model, x, codec)
        elif pricing == "model":
            bits = latent_bits(model, x, noise=False, coder_scales=True)["y"][0]
        else:
            raise ValueError(f"pricing must be 'model' or 'codec', got {pricing!r}")
    m = bits.clamp(max=MAX_ELEMENT_BITS).mean(dim=1, keepdim=True)
    m = F.interpolate(m, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return normalize_map(m)


def _tv_terms(u: torch.Tensor, tv_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    dy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return dx, dy, torch.sqrt(dx * dx + dy * dy + tv_eps)


def total_variation(u: torch.Tensor, mask: torch.Tensor | None = None, tv_eps: float = TV_EPS) -> torch.Tensor:
    """Per-image (masked) smoothed isotropic TV, [N]: sum over channels and pixels of mask * |grad u|."""
    _, _, mag = _tv_terms(u, tv_eps)
    if mask is not None:
        mag = mag * mask
    return mag.flatten(1).sum(dim=1)


def tv_gradient(u: torch.Tensor, mask: torch.Tensor, tv_eps: float = TV_EPS) -> torch.Tensor:
    """d/du of ``total_variation(u, mask)`` (analytic: minus the divergence of the mask-weighted unit gradient)."""
    dx, dy, mag = _tv_terms(u, tv_eps)
    w = mask / mag
    px, py = w * dx, w * dy
    return F.pad(px[..., :, :-1], (1, 0)) - px + F.pad(py[..., :-1, :], (0, 0, 1, 0)) - py


@torch.no_grad()
def masked_tv_denoise(x: torch.Tensor, mask: torch.Tensor | float = 1.0, weight: float = 0.1, step: float = 0.15,
                      iters: int = 100, fidelity: float = 1.0, tv_eps: float = TV_EPS) -> torch.Tensor:
    """Projected gradient descent on fidelity/2*||u-x||^2 + weight*sum(mask*TV(u)) from u = x (see module doc).

    ``mask``: [N|1, 1, H, W] (or a scalar) in [0, 1], shared by the colour channels. ``fidelity=0`` is the
    reference code's (buggy) masked diffusion, kept reachable only to test that the fidelity term matters."""
    x = x.detach()
    m = torch.as_tensor(mask, dtype=x.dtype, device=x.device)
    u = x.clone()
    for _ in range(iters):
        grad = fidelity * (u - x) + weight * tv_gradient(u, m, tv_eps)
        u = (u - step * grad).clamp_(0.0, 1.0)
    return u


def object_aware_tv(model: nn.Module, x: torch.Tensor, weight: float = 0.1, step: float = 0.15, iters: int = 100,
                    fidelity: float = 1.0, tv_eps: float = TV_EPS, pricing: str = "model",
                    codec: CodecModel | None = None) -> torch.Tensor:
    """The paper's defense: ``masked_tv_denoise`` with the input's own ``likelihood_mask`` (one extra head pass).
    ``pricing="codec"`` reproduces the edge's numpy defense (``edge_client.defense``) up to runtime rounding."""
    mask = likelihood_mask(model, x, pricing=pricing, codec=codec)
    return masked_tv_denoise(x, mask, weight, step, iters, fidelity, tv_eps)


def tv_denoise(x: torch.Tensor, weight: float = 0.1, step: float = 0.15, iters: int = 100, fidelity: float = 1.0,
               tv_eps: float = TV_EPS) -> torch.Tensor:
    """Plain TV baseline: mask = 1 everywhere."""
    return masked_tv_denoise(x, 1.0, weight, step, iters, fidelity, tv_eps)


def jpeg_reencode(x: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG round trip through Pillow (uint8 quantisation included), a classic input-transformation baseline."""
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for im in arr:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    res = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.dtype) / 255.0
    return res.to(x.device)


def bit_depth(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Feature squeezing: round to ``2**bits`` levels per channel."""
    levels = 2**int(bits) - 1
    return torch.round(x.detach().clamp(0, 1) * levels) / levels


def median_filter(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Per-channel median over a size x size window, reflect padding (odd ``size``: the exact middle value)."""
    if size % 2 != 1:
        raise ValueError(f"median size must be odd, got {size}")
    p = size // 2
    n, c, h, w = x.shape
    xp = F.pad(x.detach(), (p, p, p, p), mode="reflect")
    win = xp.unfold(2, size, 1).unfold(3, size, 1)  # [N, C, H, W, k, k]
    return win.reshape(n, c, h, w, -1).median(dim=-1).values


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius ceil(3*sigma) (shared with the numpy edge version)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur per channel, reflect padding."""
    if sigma <= 0:
        return x.detach().clone()
    k = torch.from_numpy(gaussian_kernel(sigma)).to(x.dtype).to(x.device)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    xp = F.pad(x.detach(), (r, r, r, r), mode="reflect")
    out = F.conv2d(xp, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


DefenseFn = Callable[..., torch.Tensor]
DEFENSES: dict[str, DefenseFn] = {
    "object_tv": object_aware_tv,
    "tv": lambda model, x, **kw: tv_denoise(x, **kw),
    "jpeg": lambda model, x, **kw: jpeg_reencode(x, **kw),
    "bit_depth": lambda model, x, **kw: bit_depth(x, **kw),
    "median": lambda model, x, **kw: median_filter(x, **kw),
    "gaussian": lambda model, x, **kw: gaussian_blur(x, **kw),
    "none": lambda model, x, **kw: x.detach().clone(),
}
"""Uniform calls ``fn(model, x, **kw) -> x`` (the model is used by "object_tv" only)."""
