"""The fixed-point h_s: close to the float network, exactly reproducible, exact under reordering."""

from __future__ import annotations

import numpy as np
import torch

from codec import hyper
from models.entropy import MeanScaleHyperprior


def _model() -> MeanScaleHyperprior:
    torch.manual_seed(0)
    m = MeanScaleHyperprior(24, 16).eval()
    m.update()
    return m


def test_fixed_point_tracks_float_hs() -> None:
    m = _model()
    codec = m.codec_model((24, 16, 16))
    zs = torch.randint(-4, 5, (1, 16, 4, 4))
    ref = m.h_s(zs.float() + m.z_bottleneck._get_medians())[0].detach().numpy()
    z_hat = hyper.to_fixed(zs[0].numpy()) + hyper.to_fixed(codec.medians["z"]).reshape(-1, 1, 1)
    out = hyper.synthesize(z_hat, codec.hyper_layers) / 2**hyper.ACT_BITS
    assert np.abs(out - ref).max() < 0.02 * max(1.0, np.abs(ref).max())


def test_fixed_point_is_exact_integer_arithmetic() -> None:
    codec = _model().codec_model((24, 16, 16))
    z = hyper.to_fixed(np.random.default_rng(0).integers(-6, 7, (16, 4, 4)))
    a = hyper.synthesize(z, codec.hyper_layers)
    assert np.array_equal(a, np.round(a))  # integer-valued throughout
    # the same convolution summed in another order (reversed input channels) gives identical bits
    layers = [hyper.FixedLayer(lyr.weight[:, ::-1].copy(), lyr.bias, lyr.frac, lyr.stride, lyr.padding,
                               lyr.output_padding, lyr.transposed, lyr.leaky) for lyr in codec.hyper_layers[:1]]
    first = hyper._conv(z[::-1].copy(), layers[0])
    assert np.array_equal(first, hyper._conv(z, codec.hyper_layers[0]))


def test_indexes_match_compressai_rule() -> None:
    m = _model()
    table = m.gaussian.scale_table.numpy()
    thr = hyper.scale_thresholds(table)
    scales = np.array([0.05, 0.11, 0.2, 1.0, 5.0, 300.0])
    fixed = np.floor(scales * 2**hyper.ACT_BITS)
    params = np.concatenate([fixed, np.zeros_like(fixed)]).reshape(2, 1, 6)
    idx, _ = hyper.indexes_and_means(params, thr, (1, 1, 6))
    ref = m.gaussian.build_indexes(torch.from_numpy(fixed / 2**hyper.ACT_BITS).float()).numpy()
    assert np.array_equal(idx.reshape(-1), ref)
