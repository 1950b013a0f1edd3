"""Image data: ImageFolder trees loaded into memory as uint8 tensors.

CIFAR-sized datasets are decoded once and kept as one uint8 tensor (cached as ``.npz`` beside nothing in the
dataset: the cache lives in the user's cache directory), so training is not limited by JPEG decoding on two cores.
Augmentation (pad-crop + flip) runs batched on tensors.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitinfer.images import list_image_folder, read_image


@dataclass
class ImageSet:
    """Images as uint8 NHWC, integer labels, class names and file paths (relative to the root)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _cache_path(root: Path, size: int, limit: int | None) -> Path:
    base = Path(os.environ.get("SPLITINFER_CACHE", Path.home() / ".cache" / "splitinfer"))
    key = hashlib.sha1(f"{root.resolve()}|{size}|{limit}".encode()).hexdigest()[:16]
    return base / "datasets" / f"{root.name}-{size}-{key}.npz"


def load_image_folder(root: str | os.PathLike, size: int = 32, limit: int | None = None,
                      use_cache: bool = True, per_class: bool = False) -> ImageSet:
    """Load an ImageFolder tree as uint8 images of ``size``x``size`` (resized when needed).

    ``limit`` keeps the first N images; with ``per_class`` it keeps N spread evenly over the classes so a small
    evaluation still sees every class.
    """
    root = Path(root)
    items, classes = list_image_folder(root)
    if limit is not None:
        if per_class:
            by_class: dict[int, list[tuple[str, int]]] = {}
            for it in items:
                by_class.setdefault(it[1], []).append(it)
            picked: list[tuple[str, int]] = []
            i = 0
            while len(picked) < min(limit, len(items)):
                for c in sorted(by_class):
                    if i < len(by_class[c]) and len(picked) < limit:
                        picked.append(by_class[c][i])
                i += 1
            items = sorted(picked, key=lambda t: (t[1], t[0]))
        else:
            items = items[:limit]
    cache = _cache_path(root, size, limit if not per_class else -limit if limit else None)
    if use_cache and cache.exists():
        with np.load(cache) as z:
            if len(z["labels"]) == len(items):
                return ImageSet(z["images"], z["labels"], classes, [p for p, _ in items])
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, (rel, _) in enumerate(items):
        images[i] = read_image(root / rel, size)
    labels = np.array([c for _, c in items], dtype=np.int64)
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache)
    return ImageSet(images, labels, classes, [p for p, _ in items])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] (the models normalise internally)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random pad-crop and horizontal flip of a batch (reflect padding)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # n,h
    cols = (dx[:, None] + torch.arange(w)[None, :])  # n,w
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
