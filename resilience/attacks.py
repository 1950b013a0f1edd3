"""Attacks on the entropy model of a split classifier (and the usual accuracy baseline), in torch.

Why a project-specific PGD: attack libraries (torchattacks, ART, foolbox) optimise a classification loss; the
entropy attack maximises the *rate* of the coded latent, i.e. ``-log2 p`` of the quantized latent under the learned
entropy model, so that the real byte stream grows (ECCV 2024, "Resilience of Entropy Model in Distributed Neural
Networks"). Conventions follow torchattacks/ART: ``eps`` and ``alpha`` are in [0, 1] image units, images are float
NCHW in [0, 1], ``steps``, ``eot_iter``, ``random_start``. Every attack returns a detached tensor clipped to [0, 1]
and inside the eps-ball of its input (L∞, or L2 per image), and is deterministic for a given ``seed`` (all
randomness comes from one seeded ``torch.Generator`` on the input's device).

Rounding has zero gradient, so objectives use compressai's training-time proxy: additive uniform noise
``U(-1/2, 1/2)`` on the latent. The noise draws are built here (not with compressai's ``quantize("noise")``, which
draws from the global RNG) so that attacks are reproducible. EOT ("expectation over transformation") averages the
objective over ``eot_iter`` noise draws; the encoder runs once per step and only the cheap likelihood evaluation is
repeated, since the noise enters after the encoder (MSHP: the scale/mean prediction uses the *rounded* side latent,
as in the model's forward, so it does not depend on the draw either).

All attacks put the model in eval mode and freeze its parameters (``requires_grad=False``) while they run, then
restore both the previous mode and every parameter's previous ``requires_grad``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Defense = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients while attacking (faster, and the weights' flags are left untouched)."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _generator(x: torch.Tensor, seed: int) -> torch.Generator:
    g = torch.Generator(device=x.device)
    g.manual_seed(int(seed))
    return g


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _uniform_like(v: torch.Tensor, samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """``samples`` draws of U(-1/2, 1/2) of v's shape, stacked on a new leading axis."""
    u = torch.rand((samples, *v.shape), generator=generator, device=v.device, dtype=v.dtype)
    return u - 0.5


def _factorized_likelihood(bottleneck: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """Likelihood of (noisy or rounded) values v [..., C, H, W] under an EntropyBottleneck, same shape as v.

    compressai's density network wants [C, 1, -1]; this is the reshaping its ``forward`` does, without its noise."""
    shape = v.shape
    c = shape[-3]
    flat = v.reshape(-1, c, shape[-2] * shape[-1]).permute(1, 0, 2).reshape(c, 1, -1)
    lik, _, _ = bottleneck._likelihood(flat)
    lik = bottleneck.likelihood_lower_bound(lik)
    return lik.reshape(c, -1, shape[-2] * shape[-1]).permute(1, 0, 2).reshape(shape)


def _gaussian_likelihood(gaussian: nn.Module, v: torch.Tensor, scales: torch.Tensor, means: torch.Tensor
                         ) -> torch.Tensor:
    lik = gaussian._likelihood(v, scales, means)
    return gaussian.likelihood_lower_bound(lik)


def latent_bits(model: nn.Module, x: torch.Tensor, noise: bool = True, samples: int = 1,
                generator: torch.Generator | None = None, coder_scales: bool = False) -> dict[str, torch.Tensor]:
    """Per-element ``-log2 p`` of every coded latent: {"y": [S, N, C, H, W]} (and "z" for MSHP), S = samples.

    ``noise=True``: the differentiable additive-uniform-noise proxy (S independent draws). ``noise=False``: the
    rounded latent the coder sees (S is then 1; the rounding is straight-through so the call stays differentiable,
    but the gradient is the proxy's, not the true one, which is zero almost everywhere). ``coder_scales`` (MSHP):
    price y with the scale-table entry the coder picks (compressai's ``build_indexes``) instead of the continuous
    predicted scale, i.e. what the real stream pays (no gradient through the scales then)."""
    y = model.encode_latent(x)
    ent = model.entropy
    samples = samples if noise else 1
    if ent.prior == "fp":
        med = ent.bottleneck._get_medians().reshape(1, -1, 1, 1)
        if noise:
            y_t = y.unsqueeze(0) + _uniform_like(y, samples, generator)
        else:
            y_t = (_ste_round(y - med) + med).unsqueeze(0)
        return {"y": -torch.log2(_factorized_likelihood(ent.bottleneck, y_t))}
    if ent.prior != "mshp":
        raise ValueError(f"unknown prior {ent.prior!r}")
    z = ent.h_a(y)
    z_med = ent.z_bottleneck._get_medians().reshape(1, -1, 1, 1)
    z_hat = _ste_round(z - z_med) + z_med
    scales, means = ent._params(z_hat, y)
    if coder_scales:
        scales = ent.gaussian.scale_table[ent.gaussian.build_indexes(scales.detach()).long()]
    if noise:
        z_t = z.unsqueeze(0) + _uniform_like(z, samples, generator)
        y_t = y.unsqueeze(0) + _uniform_like(y, samples, generator)
    else:
        z_t = z_hat.unsqueeze(0)
        y_t = (_ste_round(y - means) + means).unsqueeze(0)
    y_lik = _gaussian_likelihood(ent.gaussian, y_t, scales.unsqueeze(0), means.unsqueeze(0))
    z_lik = _factorized_likelihood(ent.z_bottleneck, z_t)
    return {"y": -torch.log2(y_lik), "z": -torch.log2(z_lik)}


def _fit_weight(weight: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A spatial weight map ([H, W], [N|1, 1, H, W] or a scalar) resampled to the grid ``hw``: area averaging when
    shrinking (the weight of a latent cell is the mean weight of the pixels it summarises), bilinear when growing."""
    w = weight
    if w.dim() == 0:
        return w
    if w.dim() == 2:
        w = w[None, None]
    if w.dim() != 4:
        raise ValueError(f"weight must be [H,W] or [N,1,H,W], got shape {tuple(weight.shape)}")
    if tuple(w.shape[-2:]) == hw:
        return w
    if w.shape[-2] >= hw[0] and w.shape[-1] >= hw[1]:
        return F.adaptive_avg_pool2d(w, hw)
    return F.interpolate(w, size=hw, mode="bilinear", align_corners=False)


def rate_bits(model: nn.Module, x: torch.Tensor, noise: bool = True, weight: torch.Tensor | None = None,
              samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image total ``-log2 p`` of the latent(s) (y, plus z for MSHP): the entropy attack's objective, [N].

    With ``noise=True`` it is the differentiable additive-noise proxy averaged over ``samples`` draws. ``weight``
    (spatial, resampled to each latent's grid) turns the total into a weighted sum over latent positions."""
    bits = latent_bits(model, x, noise=noise, samples=samples, generator=generator)
    total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for b in bits.values():
        if weight is not None:
            b = b * _fit_weight(weight.to(b.dtype), tuple(b.shape[-2:]))
        total = total + b.sum(dim=(2, 3, 4)).mean(dim=0)
    return total


# ------------------------------------------------------------------------------------------------ DCT low-pass
def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D [n, n] (row k = basis function k): coefficients = D @ signal, signal = D.T @ c."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def dct_lowpass(t: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the lowest ``keep`` x ``keep`` 2-D DCT-II coefficients of every channel over the SPATIAL axes (the last
    two: H, W), zero the rest, and transform back. Batch and channel axes are untouched (the reference code's bug was
    to mask other axes). Orthonormal, so the result is the orthogonal projection onto the low-frequency subspace."""
    h, w = t.shape[-2:]
    dh, dw = dct_matrix(h, t.device, t.dtype), dct_matrix(w, t.device, t.dtype)
    coef = dh @ t @ dw.T
    mask = torch.zeros(h, w, device=t.device, dtype=t.dtype)
    mask[: min(keep, h), : min(keep, w)] = 1
    return dh.T @ (coef * mask) @ dw


# ------------------------------------------------------------------------------------------------------- PGD core
def _default_alpha(eps: float, steps: int, norm: str) -> float:
    """L∞: eps/4 (the paper's sign step 0.1 followed by projection is eps*sign for any eps <= 0.1: a one-step
    attack repeated; eps/4 lets 20 steps refine). L2: 2.5*eps/steps (Madry et al.'s rule, as in torchattacks)."""
    return eps / 4 if norm == "linf" else 2.5 * eps / max(steps, 1)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Into the eps-ball around x, then into [0, 1] (clipping never moves a point out of the ball: x is inside
    [0, 1], so clipping only shortens each coordinate's offset)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / n, max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, g: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        r = torch.rand((x.shape[0], 1, 1, 1), generator=g, device=x.device, dtype=x.dtype)
        delta = d / n * r * eps
    return _project(x + delta, x, eps, norm)


def _step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return x_adv + alpha * grad / n


def _pgd(x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], eps: float, steps: int,
         alpha: float | None, norm: str, random_start: bool, g: torch.Generator,
         grad_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Gradient *ascent* of ``objective(x_adv)`` (a scalar) with projection; returns the last iterate (as
    torchattacks does). ``grad_transform`` maps the raw gradient to the step direction (low-frequency attack)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.detach()
    alpha = _default_alpha(eps, steps, norm) if alpha is None else float(alpha)
    x_adv = _random_start(x, eps, norm, g) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x_adv)
            (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if grad_transform is not None:
                x_adv = x_adv + alpha * grad_transform(grad)
            else:
                x_adv = _step(x_adv, grad, alpha, norm)
            x_adv = _project(x_adv, x, eps, norm)
    return x_adv.detach()


def _rate_objective(model: nn.Module, eot_iter: int, g: torch.Generator, weight: torch.Tensor | None
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda xa: rate_bits(model, xa, noise=True, weight=weight, samples=eot_iter, generator=g).mean()


# ------------------------------------------------------------------------------------------------------ attacks
def entropy_pgd(model: nn.Module, x: torch.Tensor, eps: float, steps: int = 20, alpha: float | None = None,
                norm: str = "linf", eot_iter: int = 16, random_start: bool = False, seed: int = 0,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy attack: PGD maximising the mean rate (``rate_bits``, EOT over ``eot_iter`` noise draws).

    ``norm="linf"`` takes sign steps (alpha default eps/4), ``norm="l2"`` normalised-gradient steps (alpha default
    2.5*eps/steps). ``weight`` (spatial map, e.g. [N,1,h,w] at the latent's grid or the image's) weights the rate
    per latent position: the region-weighted attack."""
    g = _generator(x, seed)
    with frozen_eval(model):
        return _pgd(x, _rate_objective(model, eot_iter, g, weight), eps, steps, alpha, norm, random_start, g)


def region_mask(x: torch.Tensor, region: str | torch.Tensor = "center") -> torch.Tensor:
    """A region as an image-sized weight map [N|1, 1, H, W]: "center" is the central half (side H/2 x W/2), where a
    CIFAR/ImageNet object usually is; a tensor ([H,W], [1|N,1,H,W], any grid) is used as given."""
    if isinstance(region, torch.Tensor):
        m = region.to(device=x.device, dtype=x.dtype)
        return m[None, None] if m.dim() == 2 else m
    if region != "center":
        raise ValueError(f"region must be 'center' or a mask tensor, got {region!r}")
    h, w = x.shape[-2:]
    m = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
    m[..., h // 4: h - h // 4, w // 4: w - w // 4] = 1
    return m


def region_pgd(model: nn.Module, x: torch.Tensor, eps: float, region: str | torch.Tensor = "center",
               **kw) -> torch.Tensor:
    """Region-weighted entropy attack: the rate loss is weighted by ``region`` (see ``region_mask``) resampled to
    each latent grid; the perturbation itself may go anywhere in the eps-ball. Other keywords: ``entropy_pgd``."""
    return entropy_pgd(model, x, eps, weight=region_mask(x, region), **kw)


def lowfreq_pgd(model: nn.Module, x: torch.Tensor, eps: float, keep: int = 8, steps: int = 20,
                alpha: float | None = None, eot_iter: int = 16, random_start: bool = False, seed: int = 0,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Low-frequency entropy attack (L∞), adaptive against denoisers that remove high frequencies.

    Each step's direction is the rate gradient projected onto the lowest ``keep`` x ``keep`` DCT coefficients over
    (H, W) of each channel, scaled so that its largest entry is 1 (so ``alpha`` keeps its L∞ meaning). No sign is
    taken: the sign of a smooth field has sharp edges and would reintroduce high frequencies. The iterate therefore
    stays in the low-frequency subspace except where the eps-ball or [0, 1] clipping bites."""

    def direction(grad: torch.Tensor) -> torch.Tensor:
        low = dct_lowpass(grad, keep)
        peak = low.abs().flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return low / peak

    g = _generator(x, seed)
    with frozen_eval(model):
        return _pgd(x, _rate_objective(model, eot_iter, g, weight), eps, steps, alpha, "linf", random_start, g,
                    grad_transform=direction)


def split_logits(model: nn.Module, x: torch.Tensor, latent: str = "noise", samples: int = 1,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits through the whole split model with a differentiable quantizer, [S*N, classes] (S = samples).

    ``latent="noise"``: y + U(-1/2, 1/2), the training-time proxy (rounding itself has zero gradient).
    ``latent="ste"``: the deployed rounding in the forward pass, identity gradient (straight-through/BPDA).
    ``latent="round"``: exactly what the server computes from the decoded latent (no useful gradient)."""
    y = model.encode_latent(x)
    ent = model.entropy
    if latent == "noise":
        y_t = (y.unsqueeze(0) + _uniform_like(y, samples, generator)).flatten(0, 1)
    elif latent in ("ste", "round"):
        if ent.prior == "fp":
            means = ent.bottleneck._get_medians().reshape(1, -1, 1, 1)
        else:
            z = ent.h_a(y)
            z_med = ent.z_bottleneck._get_medians().reshape(1, -1, 1, 1)
            _, means = ent._params(_ste_round(z - z_med) + z_med, y)
        y_t = _ste_round(y - means) + means if latent == "ste" else torch.round(y - means) + means
    else:
        raise ValueError(f"latent must be 'noise', 'ste' or 'round', got {latent!r}")
    return model.decode_tail(y_t)


def accuracy_pgd(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 20,
                 alpha: float | None = None, norm: str = "linf", eot_iter: int = 1, random_start: bool = False,
                 seed: int = 0, latent: str = "noise") -> torch.Tensor:
    """Untargeted PGD on the cross-entropy of the WHOLE split model (encoder -> quantizer proxy -> decoder -> tail),
    the baseline that the stealthy entropy attack is compared with. ``latent``: see ``split_logits``."""
    labels = torch.as_tensor(labels, device=x.device, dtype=torch.long)
    g = _generator(x, seed)
    samples = eot_iter if latent == "noise" else 1

    def objective(xa: torch.Tensor) -> torch.Tensor:
        logits = split_logits(model, xa, latent, samples, g)
        return F.cross_entropy(logits, labels.repeat(samples))

    with frozen_eval(model):
        return _pgd(x, objective, eps, steps, alpha, norm, random_start, g)


def sign_noise(x: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """Random ±eps per pixel (the paper's noise baseline): same L∞ budget as the attacks, no optimisation."""
    g = _generator(x, seed)
    signs = torch.randint(0, 2, x.shape, generator=g, device=x.device).to(x.dtype) * 2 - 1
    return (x.detach() + eps * signs).clamp(0.0, 1.0)


def adaptive_pgd(model: nn.Module, x: torch.Tensor, eps: float, defense: Defense, steps: int = 20,
                 alpha: float | None = None, norm: str = "linf", eot_iter: int = 16, random_start: bool = False,
                 seed: int = 0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy PGD against a defended edge: maximise the rate of ``defense(x_adv)``.

    BPDA: the defense runs forward in the loop (without gradient) and its Jacobian is taken as the identity, so the
    attack works through non-differentiable or iterative defenses (TV denoising, JPEG, bit-depth). EOT over the
    quantization noise as in ``entropy_pgd``. ``defense`` maps image tensors to image tensors."""
    g = _generator(x, seed)

    def objective(xa: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xd = defense(xa.detach())
        return rate_bits(model, xa + (xd - xa).detach(), noise=True, weight=weight, samples=eot_iter,
                         generator=g).mean()

    with frozen_eval(model):
        return _pgd(x, objective, eps, steps, alpha, norm, random_start, g)


# ----------------------------------------------------------------------------------------------------- registry
def _entropy_pgd(model, x, labels, eps, **kw):
    return entropy_pgd(model, x, eps, **kw)


def _entropy_pgd_l2(model, x, labels, eps, **kw):
    return entropy_pgd(model, x, eps, **{**kw, "norm": "l2"})


def _accuracy_pgd(model, x, labels, eps, **kw):
    if labels is None:
        raise ValueError("accuracy_pgd needs labels")
    return accuracy_pgd(model, x, labels, eps, **kw)


def _sign_noise(model, x, labels, eps, **kw):
    return sign_noise(x, eps, **kw)


def _lowfreq_pgd(model, x, labels, eps, **kw):
    return lowfreq_pgd(model, x, eps, **kw)


def _region_pgd(model, x, labels, eps, **kw):
    return region_pgd(model, x, eps, **kw)


def _adaptive_pgd(model, x, labels, eps, defense: str | Defense = "object_tv", defense_kw: dict | None = None,
                  **kw):
    """``defense``: a callable, or a name from ``resilience.defenses.DEFENSES`` (with ``defense_kw``)."""
    if isinstance(defense, str):
        from .defenses import DEFENSES

        if defense not in DEFENSES:
            raise ValueError(f"unknown defense {defense!r}; known: {', '.join(sorted(DEFENSES))}")
        fn, dkw = DEFENSES[defense], dict(defense_kw or {})

        def defense_fn(t: torch.Tensor) -> torch.Tensor:
            return fn(model, t, **dkw)
    else:
        defense_fn = defense
    return adaptive_pgd(model, x, eps, defense_fn, **kw)


AttackFn = Callable[..., torch.Tensor]
ATTACKS: dict[str, AttackFn] = {
    "entropy_pgd": _entropy_pgd,
    "entropy_pgd_l2": _entropy_pgd_l2,
    "accuracy_pgd": _accuracy_pgd,
    "sign_noise": _sign_noise,
    "lowfreq_pgd": _lowfreq_pgd,
    "region_pgd": _region_pgd,
    "adaptive_pgd": _adaptive_pgd,
}
"""Uniform calls ``fn(model, x, labels, eps, **kw)`` (labels are ignored by all but ``accuracy_pgd``)."""
