"""Every family x prior builds, trains a step and codes losslessly; paper-scale models run at 224x224."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbones import FAMILIES, build_backbone, get_spec
from models.split import SplitModel, bits_per_pixel

CIFAR_FAMILIES = [n for n, s in FAMILIES.items() if not s.paper_scale]
PAPER_FAMILIES = [n for n, s in FAMILIES.items() if s.paper_scale]


@pytest.mark.parametrize("arch", CIFAR_FAMILIES)
@pytest.mark.parametrize("prior", ["fp", "mshp"])
def test_cifar_family_trains_one_step_and_codes_losslessly(arch: str, prior: str) -> None:
    torch.manual_seed(0)
    model = SplitModel(arch, prior)
    x = torch.rand(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    assert out.logits.shape == (8, 10)
    loss = F.cross_entropy(out.logits, labels) + 0.08 * bits_per_pixel(out.likelihoods, 32 * 32)
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    model.eval()
    model.entropy.update()
    _assert_codes_losslessly(model, x[:2])


def _assert_codes_losslessly(model: SplitModel, x: torch.Tensor) -> None:
    """Every image codes to bytes and decodes to exactly the symbols coded, and to (nearly, for MSHP's fixed-point
    means) the latent the model itself computes."""
    codec = model.codec_model()
    with torch.no_grad():
        y = model.encode_latent(x)
        z = model.entropy.side_latent(y)
        reference = model.entropy(y).y_hat.numpy()
    for j in range(len(x)):
        enc = codec.encode(y[j].numpy(), None if z is None else z[j].numpy())
        assert len(enc.data) > 0
        y_hat = codec.decode(enc.data, enc.index_checksum)
        assert np.array_equal(y_hat, codec.dequantize(enc.symbols))
        close = np.abs(y_hat - reference[j]) < (1e-5 if model.prior == "fp" else 0.05)
        assert close.mean() > 0.99


@pytest.mark.parametrize("arch", PAPER_FAMILIES)
def test_paper_scale_forward_backward_and_coding(arch: str) -> None:
    torch.manual_seed(0)
    model = SplitModel(arch, "mshp" if arch == "resnet50" else "fp")
    spec = get_spec(arch)
    x = torch.rand(1, 3, 224, 224)
    out = model(x)
    assert out.logits.shape == (1, spec.num_classes)
    assert out.features.shape == (1, spec.split_channels, 56, 56)
    assert model.latent_shape() == (spec.latent_channels, 55, 55)
    (out.logits.sum() + bits_per_pixel(out.likelihoods, 224 * 224)).backward()
    model.eval()
    model.entropy.update()
    _assert_codes_losslessly(model, x)


@pytest.mark.parametrize("arch", PAPER_FAMILIES)
def test_paper_scale_split_matches_backbone_shapes(arch: str) -> None:
    backbone = build_backbone(arch)
    with torch.no_grad():
        feats = backbone.features(torch.rand(1, 3, 224, 224))
    assert feats.shape[1:] == (get_spec(arch).split_channels, 56, 56)


def test_unknown_arch_and_prior_are_named() -> None:
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        SplitModel("vgg", "fp")
    with pytest.raises(ValueError, match="unknown prior 'gmm'"):
        SplitModel("resnet", "gmm")


def test_fingerprint_changes_with_tables() -> None:
    a = SplitModel("resnet", "fp")
    a.entropy.update()
    fp1 = a.codec_model().fingerprint
    assert a.codec_model().fingerprint == fp1
    with torch.no_grad():
        a.entropy.bottleneck.matrices[0].add_(0.5)
    a.entropy.update()
    assert a.codec_model().fingerprint != fp1
