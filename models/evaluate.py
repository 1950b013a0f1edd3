"""Evaluation in real bytes: every image is entropy-coded on its own (batch-size-1 semantics), decoded again, and
classified from the *decoded* latent. Reported sizes are lengths of the actual coded byte strings, next to the
entropy model's own estimate (-log2 likelihood / 8) and to the same images as JPEG (quality 90, Pillow).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .data import ImageSet, load_image_folder, to_tensor
from .split import SplitModel


class LosslessError(RuntimeError):
    """Decoded symbols differ from the encoded ones: the codec is broken, never a result to report."""


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> int:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue())


@torch.no_grad()
def evaluate_split(model: SplitModel, data: ImageSet, batch_size: int = 100, progress: bool = True) -> dict:
    """Accuracy and real/estimated/JPEG bytes per image of a split model on in-memory images.

    The path is the deployed one: head (torch here) -> CodecModel.encode -> bytes -> CodecModel.decode -> tail."""
    model.eval()
    codec = model.codec_model()
    n = len(data)
    real = np.zeros(n)
    est = np.zeros(n)
    correct = 0
    t0 = time.time()
    bar = tqdm(total=n, desc="eval", disable=not progress, dynamic_ncols=True, mininterval=2.0)
    for i in range(0, n, batch_size):
        x = to_tensor(data.images[i:i + batch_size])
        y = model.encode_latent(x)
        z = model.entropy.side_latent(y)
        lik = model.entropy(y).likelihoods
        est[i:i + len(x)] = sum((-torch.log2(v)).sum(dim=(1, 2, 3)) for v in lik.values()).numpy() / 8.0
        y_np = y.numpy()
        z_np = None if z is None else z.numpy()
        y_hats = np.empty_like(y_np)
        for j in range(len(x)):
            zj = None if z_np is None else z_np[j]
            enc = codec.encode(y_np[j], zj)
            real[i + j] = len(enc.data)
            y_hats[j] = codec.decode(enc.data, enc.index_checksum)
            if not np.array_equal(y_hats[j], codec.dequantize(enc.symbols)):
                raise LosslessError(f"decoded latent of image {i + j} differs from the encoded one")
        logits = model.decode_tail(torch.from_numpy(y_hats))
        correct += int((logits.argmax(1).numpy() == data.labels[i:i + len(x)]).sum())
        bar.update(len(x))
    bar.close()
    elapsed = time.time() - t0
    jpeg = np.array([jpeg_bytes(im) for im in data.images])
    return {
        "images": n,
        "accuracy": correct / n,
        "bytes_real_mean": float(real.mean()),
        "bytes_real_p95": float(np.percentile(real, 95)),
        "bytes_estimated_mean": float(est.mean()),
        "real_over_estimated": float(real.mean() / est.mean()),
        "jpeg_bytes_mean": float(jpeg.mean()),
        "real_over_jpeg": float(real.mean() / jpeg.mean()),
        "images_per_s": n / elapsed,
    }


def load_split_model(name_or_path: str) -> tuple[SplitModel, dict]:
    """A split model from a checkpoint (bundled name or path), tables rebuilt and checked against the manifest."""
    ck = read_checkpoint(name_or_path)
    man = ck["manifest"]
    if man.get("kind") != "split":
        raise CheckpointError(f"{ck['path']}: expected a split-model checkpoint, found kind={man.get('kind')!r}")
    try:
        model = SplitModel(man["arch"], man["prior"], len(man["classes"]))
        load_with_tables(model, ck["state_dict"])
        fp = model.codec_model().fingerprint
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{ck['path']}: weights do not fit the manifest ({exc})") from exc
    model.eval()
    if man.get("fingerprint") and man["fingerprint"] != fp:
        raise CheckpointError(f"{ck['path']}: CDF tables rebuilt here differ from the manifest's fingerprint")
    return model, man


def load_with_tables(model: torch.nn.Module, state_dict: dict) -> None:
    """Load weights *and* the saved CDF tables. The tables are not rebuilt: rebuilding runs float code whose last
    bits may differ on another CPU, and the tables must stay exactly those the fingerprint names."""
    buffers = dict(model.named_buffers())
    for name, value in state_dict.items():
        if name in buffers and buffers[name].shape != value.shape:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner.register_buffer(attr, torch.empty_like(value))
    model.load_state_dict(state_dict)
    for name in state_dict:
        if name.endswith("_quantized_cdf") and state_dict[name].numel() == 0:
            raise ValueError(f"checkpoint has no CDF tables ({name} is empty): it was saved before update()")


def finalize_split_model(model: SplitModel, cfg, classes: list[str]) -> dict:
    """Build CDF tables, measure (when validation data is given) and save the checkpoint with its manifest."""
    model.eval()
    model.entropy.update()
    manifest = {
        "kind": "split", "arch": cfg.arch, "prior": cfg.prior, "beta": cfg.beta, "classes": classes,
        "dataset": str(cfg.data), "epochs": cfg.epochs, "distill_epochs": cfg.distill_epochs,
        "input_size": model.spec.input_size, "latent_shape": list(model.latent_shape()),
        "train_config": asdict(cfg),
    }
    limit = cfg.extra.get("val_limit")
    return measure_and_save(model, manifest, cfg.out, cfg.val_data, limit)


def measure_and_save(model: SplitModel, manifest: dict, out: str, val_data: str | None, val_limit: int | None
                     ) -> dict:
    """Fill the manifest's codec fingerprint and (with validation data) measured figures, then save atomically.
    Also used to re-measure an existing checkpoint (``splitinfer models refresh``)."""
    model.eval()
    model.entropy.update()
    manifest = dict(manifest, fingerprint=model.codec_model().fingerprint)
    if val_data:
        val = load_image_folder(val_data, model.spec.input_size, val_limit, per_class=val_limit is not None)
        res = evaluate_split(model, val)
        manifest.update({"val_data": str(val_data), "accuracy": res["accuracy"],
                         "bytes_real_mean": res["bytes_real_mean"], "bytes_estimated_mean": res["bytes_estimated_mean"],
                         "jpeg_bytes_mean": res["jpeg_bytes_mean"], "val_images": res["images"]})
    save_checkpoint(out, model.state_dict(), manifest)
    return manifest
