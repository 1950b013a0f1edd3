"""Shared fixtures: real CIFAR-10 from ../shared/datasets when present, else small image trees the tests make."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
SAMPLE_IMAGES = ROOT / "splitinfer" / "sample_images"

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["SPLITINFER_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def make_image_tree(root: Path, classes: int = 3, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder tree of smooth random PNG images (lossless, so tests can compare pixels)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
            img.save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return make_image_tree(tmp_path / "images")


@pytest.fixture
def cifar_test() -> Path:
    if not (CIFAR / "test").is_dir():
        pytest.skip(f"CIFAR-10 test tree not found at {CIFAR / 'test'} (see ../shared/datasets/README.md)")
    return CIFAR / "test"


def eval_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n test images (uint8 NHWC) and labels: CIFAR-10 test where present, else the package's 200 sample test
    images (real labels), else made (labels then meaningless)."""
    from models.data import load_image_folder

    if (CIFAR / "test").is_dir():
        data = load_image_folder(CIFAR / "test", 32, n, per_class=True, use_cache=False)
        return data.images, data.labels
    if n <= 200:
        data = load_image_folder(SAMPLE_IMAGES, 32, n, per_class=True, use_cache=False)
        return data.images, data.labels
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    images = np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.BILINEAR)) for s in small])
    return images, rng.integers(0, 10, n)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Edge bundles exported from the bundled checkpoints."""
    from models.export import export_bundle

    out = {}
    for prior in ("fp", "mshp"):
        d = tmp_path_factory.mktemp(f"bundle-{prior}")
        export_bundle(f"default-{prior}", d)
        out[prior] = d
    return out


@pytest.fixture(scope="session")
def servers():
    """Real gRPC servers on loopback (ephemeral ports) serving the bundled checkpoints."""
    from server.service import RunningServer, ServerConfig

    running = {p: RunningServer(ServerConfig(insecure=True, checkpoint=f"default-{p}", port=0, max_delay_ms=2.0))
               for p in ("fp", "mshp")}
    yield running
    for s in running.values():
        s.stop(1.0)
