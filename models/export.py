"""Edge bundles: what a torch-free edge needs to run the head and code its latent.

``export_bundle(checkpoint, out_dir)`` writes

* ``head.onnx``  — image [N,3,S,S] float in [0,1] -> ``y`` (and ``z`` = h_a(y) for MSHP), for onnxruntime;
* ``codec.npz``  — the :class:`codec.model.CodecModel` (CDF tables, medians, fixed-point h_s);
* ``bundle.json`` — model id, codec fingerprint, arch, prior, shapes, classes, file hashes.

compressai's GDN reparametrizes its parameters with a custom autograd function that ONNX export does not need:
the exported head uses the same arithmetic with the effective (baked) parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import nn

from .evaluate import load_split_model
from .split import SplitModel

BUNDLE_FORMAT = "splitinfer-edge-bundle/1"


class BakedGDN(nn.Module):
    """GDN / IGDN with its effective beta and gamma as plain buffers (same math as compressai's forward)."""

    def __init__(self, gdn: GDN) -> None:
        super().__init__()
        c = gdn.beta.shape[0]
        self.register_buffer("beta", gdn.beta_reparam(gdn.beta).detach().clone())
        self.register_buffer("gamma", gdn.gamma_reparam(gdn.gamma).detach().clone().reshape(c, c, 1, 1))
        self.inverse = gdn.inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = F.conv2d(x * x, self.gamma, self.beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


def bake(module: nn.Module) -> nn.Module:
    """Replace every GDN in ``module`` (in place) by a BakedGDN."""
    for name, child in list(module.named_children()):
        if isinstance(child, GDN):
            setattr(module, name, BakedGDN(child))
        else:
            bake(child)
    return module


class EdgeHead(nn.Module):
    """The edge's graph: normalize -> encoder (-> h_a for MSHP)."""

    def __init__(self, model: SplitModel) -> None:
        super().__init__()
        import copy

        self.normalize = copy.deepcopy(model.normalize)
        self.encoder = bake(copy.deepcopy(model.encoder))
        self.h_a = copy.deepcopy(model.entropy.h_a) if model.prior == "mshp" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.encoder(self.normalize(x))
        return (y,) if self.h_a is None else (y, self.h_a(y))


def model_id(manifest: dict, fingerprint: str) -> str:
    return f"{manifest['arch']}-{manifest['prior']}-b{manifest['beta']}-{fingerprint[:12]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_bundle(checkpoint: str, out_dir: str | os.PathLike, opset: int = 17) -> dict:
    model, man = load_split_model(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codec = model.codec_model()
    head = EdgeHead(model).eval()
    size = model.spec.input_size
    outputs = ["y"] if model.prior == "fp" else ["y", "z"]
    onnx_tmp = out / "head.onnx.tmp"
    with torch.no_grad():
        torch.onnx.export(head, (torch.rand(1, 3, size, size),), str(onnx_tmp), input_names=["image"],
                          output_names=outputs, opset_version=opset, dynamo=False,
                          dynamic_axes={"image": {0: "n"}, **{o: {0: "n"} for o in outputs}})
    os.replace(onnx_tmp, out / "head.onnx")
    codec.save(out / "codec.npz")
    info = {
        "format": BUNDLE_FORMAT, "model_id": model_id(man, codec.fingerprint), "fingerprint": codec.fingerprint,
        "arch": man["arch"], "prior": man["prior"], "beta": man["beta"], "input_size": size,
        "latent_shape": list(codec.latent_shape), "hyper_shape": list(codec.hyper_shape or []),
        "classes": man["classes"], "outputs": outputs, "opset": opset,
        "files": {"head.onnx": _sha256(out / "head.onnx"), "codec.npz": _sha256(out / "codec.npz")},
        "checkpoint_manifest": {k: man.get(k) for k in ("accuracy", "bytes_real_mean", "dataset", "epochs")},
    }
    tmp = out / "bundle.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "bundle.json")
    return info
