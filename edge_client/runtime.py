"""The edge runtime: an exported bundle run with onnxruntime and the numpy codec. Imports no torch.

Execution providers: TensorRT, then CUDA, then CPU — whichever this onnxruntime build offers (``providers=`` to
choose). The entropy coding itself is numpy + constriction on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codec.model import CodecModel, Encoded

BUNDLE_FORMAT = "splitinfer-edge-bundle/1"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class BundleError(ValueError):
    """An edge bundle that is missing, incomplete or altered."""


@dataclass
class EdgeBundle:
    path: Path
    info: dict
    codec: CodecModel

    @classmethod
    def load(cls, path: str | os.PathLike) -> EdgeBundle:
        path = Path(path)
        meta = path / "bundle.json"
        if not meta.is_file():
            raise BundleError(f"{path}: not an edge bundle (no bundle.json; create one with splitinfer export)")
        info = json.loads(meta.read_text())
        if info.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{meta}: unknown bundle format {info.get('format')!r}")
        for name, digest in info["files"].items():
            f = path / name
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != digest:
                raise BundleError(f"{f}: missing or altered (sha256 differs from bundle.json)")
        codec = CodecModel.load(path / "codec.npz")
        if codec.fingerprint != info["fingerprint"]:
            raise BundleError(f"{path}: codec.npz fingerprint differs from bundle.json")
        return cls(path, info, codec)


class EdgeEncoder:
    """Images -> coded streams with the bundle's head (onnxruntime) and codec."""

    def __init__(self, bundle: EdgeBundle | str | os.PathLike, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, EdgeBundle) else EdgeBundle.load(bundle)
        available = ort.get_available_providers()
        chosen = [p for p in (providers or PREFERRED_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.bundle.path / "head.onnx"), opts, providers=chosen)
        self.providers = self.session.get_providers()

    @property
    def input_size(self) -> int:
        return int(self.bundle.info["input_size"])

    def head(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 NHWC (or float NCHW in [0,1]) -> y [N,C,H,W] (and z for MSHP)."""
        x = images
        if x.dtype == np.uint8:
            x = x.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        outs = self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def encode(self, images: np.ndarray) -> list[Encoded]:
        y, z = self.head(images)
        return [self.bundle.codec.encode(y[i], None if z is None else z[i]) for i in range(len(y))]
