"""Edge (onnxruntime head + numpy codec) vs server (torch checkpoint + numpy codec, 1 and 2 torch threads):
identical scale indexes on 2,000 images, lossless symbols, and an injected index flip reported as an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codec import hyper
from codec.ans import encode_layers
from codec.model import IndexMismatchError
from edge_client.runtime import EdgeEncoder

from .conftest import ROOT, eval_images

SERVER_SIDE = r"""
import sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
from models.evaluate import load_split_model
model, _ = load_split_model("default-mshp")
codec = model.codec_model()
d = dict(np.load(sys.argv[1]))  # NpzFile re-reads an array on every access: load each once
lengths, blob = d["lengths"], d["blob"].tobytes()
offsets = np.concatenate([[0], np.cumsum(lengths)])
mism = lossy = 0
for i in range(len(lengths)):
    data = blob[offsets[i]:offsets[i + 1]]
    y_hat, idx = codec.decode_with_indexes(data, int(d["checksums"][i]))  # raises on a checksum mismatch
    mism += int((idx != d["y_idx"][i]).sum())
    lossy += int(not np.array_equal(y_hat, d["y_hat"][i]))
print(codec.fingerprint, mism, lossy)
"""


@pytest.fixture(scope="module")
def edge_streams(bundles: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EdgeEncoder]:
    images, _ = eval_images(2000)
    encoder = EdgeEncoder(bundles["mshp"])
    encoded = []
    for i in range(0, len(images), 250):
        encoded += encoder.encode(images[i:i + 250])
    path = tmp_path_factory.mktemp("xrt") / "edge.npz"
    np.savez(path, lengths=np.array([len(e.data) for e in encoded]),
             blob=np.frombuffer(b"".join(e.data for e in encoded), np.uint8),
             checksums=np.array([e.index_checksum for e in encoded], np.int64),
             y_idx=np.stack([e.symbols["y_idx"] for e in encoded]),
             y_hat=np.stack([encoder.bundle.codec.dequantize(e.symbols) for e in encoded]))
    return path, encoder


@pytest.mark.parametrize("threads", [1, 2])
def test_server_path_decodes_edge_streams_bit_exactly(edge_streams: tuple, threads: int) -> None:
    path, encoder = edge_streams
    proc = subprocess.run([sys.executable, "-c", SERVER_SIDE, str(path), str(threads)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fingerprint, mismatches, lossy = proc.stdout.split()
    assert fingerprint == encoder.bundle.info["fingerprint"]
    assert int(mismatches) == 0  # over 2,000 images x 6,144 indexes
    assert int(lossy) == 0
    assert len(np.load(path)["lengths"]) >= 2000


def test_injected_index_flip_is_reported(edge_streams: tuple) -> None:
    _, encoder = edge_streams
    codec = encoder.bundle.codec
    images, _ = eval_images(1)
    y, z = encoder.head(images)
    q = codec.quantize(y[0], z[0])
    idx = q["y_idx"].copy()
    idx[3, 5, 7] = min(idx[3, 5, 7] + 1, codec.tables["y"].num_tables - 1) if idx[3, 5, 7] == 0 else idx[3, 5, 7] - 1
    data = encode_layers([(q["z"], q["z_idx"], codec.tables["z"]), (q["y"], idx, codec.tables["y"])])
    with pytest.raises(IndexMismatchError):
        codec.decode(data, hyper.index_checksum(idx))
    honest = codec.encode(y[0], z[0])
    assert np.array_equal(codec.decode(honest.data, honest.index_checksum), codec.dequantize(honest.symbols))
