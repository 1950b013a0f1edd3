"""Reading images and ImageFolder trees, with no torch: shared by training/evaluation and the torch-free edge."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def list_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(relative path, class index) pairs of an ImageFolder tree, sorted like torchvision does."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} holds no class folders (expected ImageFolder layout root/<class>/<image>)")
    items: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name)):
            for f in sorted(files):
                if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((str(Path(dirpath, f).relative_to(root)), idx))
    if not items:
        raise ValueError(f"{root} holds no images")
    return items, classes


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read one image as uint8 HWC RGB of ``size``x``size``; a clear error names an unreadable file."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def collect_images(sources: list[str]) -> list[Path]:
    """Image files from a mix of files and directories (searched recursively), in a stable order."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or directory: {src}")
    if not out:
        raise ValueError(f"no images found in {', '.join(sources)}")
    return out
