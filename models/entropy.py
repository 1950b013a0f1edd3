"""Learned entropy models of the latent: factorized prior (FP) and mean-scale hyperprior (MSHP).

Both wrap compressai's density models (EntropyBottleneck, GaussianConditional). Training uses compressai's
additive-uniform-noise proxy for the likelihoods; the latent handed to the decoder is rounded with a
straight-through gradient, so the tail trains on exactly what it will receive after entropy decoding.

For coding, a trained model exports a torch-free :class:`codec.model.CodecModel` (CDF tables, medians and, for
MSHP, a bit-exact fixed-point copy of ``h_s``); every coding path of the project goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from torch import nn

from codec import hyper
from codec.ans import CdfTables
from codec.model import CodecModel

SCALES_MIN, SCALES_MAX, SCALES_LEVELS = 0.11, 256.0, 64
# compressai starts its densities 10 units wide; latents here start near unit scale, and a 10-epoch CPU budget
# cannot afford the steps it takes to narrow them (measured: ~32 bits/pixel after 100 steps from 10, see train.py).
INIT_SCALE = 1.0


def scale_table() -> list[float]:
    """compressai's default log-spaced Gaussian scale table."""
    return torch.exp(torch.linspace(np.log(SCALES_MIN), np.log(SCALES_MAX), SCALES_LEVELS)).tolist()


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


@dataclass
class EntropyOutput:
    y_hat: torch.Tensor  # quantized latent (rounded; straight-through gradient)
    likelihoods: dict[str, torch.Tensor]  # per-element likelihoods of every coded latent


def _tables_of(module: EntropyBottleneck | GaussianConditional) -> CdfTables:
    return CdfTables(module._quantized_cdf.numpy().astype(np.int32).copy(),
                     module._cdf_length.numpy().astype(np.int32).copy(),
                     module._offset.numpy().astype(np.int32).copy())


class EntropyModelBase(nn.Module):
    prior = "base"

    def update(self) -> None:
        """(Re)build the quantized CDF tables from the learned densities; call after training or loading."""
        raise NotImplementedError

    def side_latent(self, y: torch.Tensor) -> torch.Tensor | None:
        """What the edge computes besides y (MSHP: z = h_a(y)); None for FP."""
        return None

    def codec_model(self, latent_shape: tuple[int, int, int]) -> CodecModel:
        """Export the coding state (call ``update`` first) as a torch-free CodecModel."""
        raise NotImplementedError

    def density_parameters(self) -> list[nn.Parameter]:
        """Parameters of the learned factorized densities (compressai's ``quantiles`` excluded: they are fitted by
        bisection in ``update``)."""
        return [p for m in self.modules() if isinstance(m, EntropyBottleneck)
                for n, p in m.named_parameters() if n != "quantiles"]

    def network_parameters(self) -> list[nn.Parameter]:
        """Other trainable parameters (the hyper-analysis/synthesis networks of MSHP)."""
        skip = {id(p) for m in self.modules() if isinstance(m, EntropyBottleneck) for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]


class FactorizedPrior(EntropyModelBase):
    """FP: one learned non-parametric density per latent channel (compressai EntropyBottleneck)."""

    prior = "fp"

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.bottleneck = EntropyBottleneck(latent_channels, init_scale=INIT_SCALE)

    def forward(self, y: torch.Tensor) -> EntropyOutput:
        _, lik = self.bottleneck(y, training=self.training)
        medians = self.bottleneck._get_medians()
        return EntropyOutput(_ste_round(y - medians) + medians, {"y": lik})

    def update(self) -> None:
        self.bottleneck.update(force=True, update_quantiles=True)

    def codec_model(self, latent_shape: tuple[int, int, int]) -> CodecModel:
        medians = self.bottleneck._get_medians().detach().reshape(-1).numpy().astype(np.float32)
        return CodecModel("fp", latent_shape, {"y": _tables_of(self.bottleneck)}, {"y": medians})


class MeanScaleHyperprior(EntropyModelBase):
    """MSHP: side latent z (factorized) predicts a Gaussian mean and scale for every element of y."""

    prior = "mshp"

    def __init__(self, latent_channels: int, hyper_channels: int, width: int = 64) -> None:
        super().__init__()
        n = latent_channels
        self.h_a = nn.Sequential(
            nn.Conv2d(n, width, 3, 1, 1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(width, width, 5, 2, 2), nn.LeakyReLU(inplace=True),
            nn.Conv2d(width, hyper_channels, 5, 2, 2),
        )
        self.h_s = nn.Sequential(
            nn.ConvTranspose2d(hyper_channels, width, 5, 2, 2, output_padding=1), nn.LeakyReLU(inplace=True),
            nn.ConvTranspose2d(width, width, 5, 2, 2, output_padding=1), nn.LeakyReLU(inplace=True),
            nn.Conv2d(width, 2 * n, 3, 1, 1),
        )
        self.z_bottleneck = EntropyBottleneck(hyper_channels, init_scale=INIT_SCALE)
        self.gaussian = GaussianConditional(scale_table())

    def _params(self, z_hat: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.h_s(z_hat)
        params = params[..., : like.shape[-2], : like.shape[-1]]
        scales, means = params.chunk(2, dim=1)
        return scales, means

    def forward(self, y: torch.Tensor) -> EntropyOutput:
        z = self.h_a(y)
        _, z_lik = self.z_bottleneck(z, training=self.training)
        z_med = self.z_bottleneck._get_medians()
        z_hat = _ste_round(z - z_med) + z_med
        scales, means = self._params(z_hat, y)
        _, y_lik = self.gaussian(y, scales, means=means, training=self.training)
        return EntropyOutput(_ste_round(y - means) + means, {"y": y_lik, "z": z_lik})

    def update(self) -> None:
        self.z_bottleneck.update(force=True, update_quantiles=True)
        self.gaussian.update_scale_table(scale_table(), force=True)

    def side_latent(self, y: torch.Tensor) -> torch.Tensor:
        return self.h_a(y)

    def codec_model(self, latent_shape: tuple[int, int, int]) -> CodecModel:
        convs = [m for m in self.h_s if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        layers = []
        for i, m in enumerate(convs):
            transposed = isinstance(m, nn.ConvTranspose2d)
            layers.append(hyper.quantize_layer(
                m.weight.detach().numpy(), m.bias.detach().numpy(), stride=m.stride[0], padding=m.padding[0],
                output_padding=m.output_padding[0] if transposed else 0, transposed=transposed,
                leaky=i < len(convs) - 1))
        with torch.no_grad():
            z_shape = tuple(self.h_a(torch.zeros(1, *latent_shape)).shape[1:])
        medians = self.z_bottleneck._get_medians().detach().reshape(-1).numpy().astype(np.float32)
        return CodecModel("mshp", latent_shape, {"z": _tables_of(self.z_bottleneck), "y": _tables_of(self.gaussian)},
                          {"z": medians}, layers, hyper.scale_thresholds(self.gaussian.scale_table.numpy()),
                          z_shape)  # type: ignore[arg-type]


def build_entropy_model(prior: str, latent_channels: int, hyper_channels: int) -> EntropyModelBase:
    if prior == "fp":
        return FactorizedPrior(latent_channels)
    if prior == "mshp":
        return MeanScaleHyperprior(latent_channels, hyper_channels)
    raise ValueError(f"unknown prior {prior!r}; known: fp, mshp")
