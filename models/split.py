"""Split classifiers: Entropic-Student bottleneck (conv/GDN encoder -> entropy-coded latent -> decoder) in place of a
backbone's stem and first stage, followed by the backbone's remaining layers (the tail).

``SplitModel.forward`` is the training/evaluation graph (image -> logits plus likelihoods). The deployment
graph is the same modules cut in two: ``head`` (normalize + encoder, run on the edge) and ``decode_tail``
(decoder + tail, run on the server), with the entropy model's coding in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressai.layers import GDN
from torch import nn

from codec.model import CodecModel

from .backbones import BackboneSpec, Normalize, build_backbone, get_spec
from .entropy import EntropyModelBase, build_entropy_model


def build_encoder(spec: BackboneSpec) -> nn.Sequential:
    """conv5x5/2 -> GDN -> conv (5x5/2 at paper scale, 3x3/1 at CIFAR scale) -> GDN -> conv to the latent."""
    w = spec.bottleneck_width
    if spec.paper_scale:  # 224 -> 112 -> 56 -> 55 (Entropic Student's 2x2 valid conv)
        return nn.Sequential(nn.Conv2d(3, w, 5, 2, 2), GDN(w), nn.Conv2d(w, w // 2, 5, 2, 2), GDN(w // 2),
                             nn.Conv2d(w // 2, spec.latent_channels, 2, 1, 0))
    return nn.Sequential(nn.Conv2d(3, w, 5, 2, 2), GDN(w), nn.Conv2d(w, w // 2, 3, 1, 1), GDN(w // 2),
                         nn.Conv2d(w // 2, spec.latent_channels, 3, 1, 1))


def build_decoder(spec: BackboneSpec) -> nn.Sequential:
    """Latent back to the backbone's split-point width (and, at paper scale, 55 -> 56 spatially).

    At CIFAR scale the hidden width is the split width itself: the decoder costs as much as the tail's first stage
    on two CPU cores, so it is kept narrow (measured: 96 -> 64 halves its share of a training step)."""
    w = spec.bottleneck_width if spec.paper_scale else spec.split_channels
    first = (nn.ConvTranspose2d(spec.latent_channels, w, 2, 1, 0) if spec.paper_scale
             else nn.Conv2d(spec.latent_channels, w, 3, 1, 1))
    return nn.Sequential(first, GDN(w, inverse=True), nn.Conv2d(w, spec.split_channels, 3, 1, 1),
                         nn.BatchNorm2d(spec.split_channels), nn.ReLU(inplace=True))


@dataclass
class SplitOutput:
    logits: torch.Tensor
    likelihoods: dict[str, torch.Tensor]
    features: torch.Tensor  # decoder output (what the tail sees), for distillation


class SplitModel(nn.Module):
    """image in [0,1] -> encoder -> entropy model -> decoder -> tail -> logits."""

    def __init__(self, arch: str, prior: str, num_classes: int | None = None) -> None:
        super().__init__()
        self.spec = get_spec(arch)
        self.arch, self.prior = arch, prior
        backbone = build_backbone(arch, num_classes)
        self.normalize: Normalize = backbone.normalize
        self.encoder = build_encoder(self.spec)
        self.entropy: EntropyModelBase = build_entropy_model(prior, self.spec.latent_channels,
                                                             self.spec.hyper_channels)
        self.decoder = build_decoder(self.spec)
        self.tail = backbone.tail

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The edge's head: the continuous latent y."""
        return self.encoder(self.normalize(x))

    def decode_tail(self, y_hat: torch.Tensor) -> torch.Tensor:
        """The server's part: quantized latent -> logits."""
        return self.tail(self.decoder(y_hat))

    def forward(self, x: torch.Tensor) -> SplitOutput:
        y = self.encode_latent(x)
        ent = self.entropy(y)
        feats = self.decoder(ent.y_hat)
        return SplitOutput(self.tail(feats), ent.likelihoods, feats)

    def codec_model(self) -> CodecModel:
        """The torch-free coding state (tables, medians, fixed-point h_s); call ``entropy.update()`` first."""
        return self.entropy.codec_model(self.latent_shape())

    def latent_shape(self, input_size: int | None = None) -> tuple[int, int, int]:
        s = input_size or self.spec.input_size
        with torch.no_grad():
            y = self.encoder(torch.zeros(1, 3, s, s))
        return tuple(y.shape[1:])  # type: ignore[return-value]


def bits_per_pixel(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Mean over the batch of -log2 p summed over every coded latent, per input pixel."""
    total = sum(torch.log2(lik).sum(dim=tuple(range(1, lik.dim()))) for lik in likelihoods.values())
    return -(total / num_pixels).mean()
