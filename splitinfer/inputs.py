"""Experiment conditions named by tags, and their input images, computed once and cached.

A tag names what an edge sends: ``clean``, ``attack:<attack>:<eps in 1/255>``, ``corruption:<name>:<severity>`` or
``defended:<defense>`` (the defense applied on the edge to the ``attack:entropy_pgd:<defend_eps>`` inputs). The demo
and the load generator share this, so the same tag means the same pixels everywhere. Attacked and corrupted images
are stored as uint8 (lossless) npz files keyed by the checkpoint's fingerprint and the source images, written
atomically so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ATTACK = "entropy_pgd"


@dataclass(frozen=True)
class Condition:
    tag: str
    kind: str  # clean | attack | corruption | defended
    name: str = ""
    level: int = 0
    source: str = ""  # defended: the attack tag whose images are defended


def parse_tag(tag: str, defend_eps: int = 8) -> Condition:
    parts = tag.split(":")
    kind = parts[0]
    try:
        if tag == "clean":
            return Condition(tag, "clean")
        if kind in ("attack", "corruption") and len(parts) == 3:
            return Condition(tag, kind, parts[1], int(parts[2]))
        if kind == "defended" and len(parts) == 2:
            return Condition(tag, kind, parts[1], defend_eps, f"attack:{DEFAULT_ATTACK}:{defend_eps}")
    except ValueError:
        pass
    raise ValueError(f"tag {tag!r}: expected clean, attack:<name>:<eps>, corruption:<name>:<severity> or "
                     "defended:<defense>")


def cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``path`` or compute and write it atomically."""
    if path.exists():
        with np.load(path) as z:
            return z["images"]
    images = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images)
    os.replace(tmp, path)
    return images


def attacked_images(checkpoint: str, images: np.ndarray, attack: str, eps: int, steps: int, eot: int, seed: int,
                    labels: np.ndarray | None = None, batch: int = 50) -> np.ndarray:
    """Run a registered attack on uint8 NHWC images; the result is rounded back to uint8 inside the ε-ball."""
    import torch

    from models.evaluate import load_split_model
    from resilience.attacks import ATTACKS

    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r} is not one of {sorted(ATTACKS)}")
    model, _ = load_split_model(checkpoint)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels if labels is not None else np.zeros(len(images), dtype=np.int64))
    kw = {"steps": steps, "eot_iter": eot} if attack != "sign_noise" else {}
    out = [ATTACKS[attack](model, x[i:i + batch], y[i:i + batch], eps / 255.0, seed=seed + i, **kw)
           for i in range(0, len(x), batch)]
    adv = torch.cat(out).permute(0, 2, 3, 1).numpy() * 255.0
    lo = images.astype(np.int16) - eps
    hi = images.astype(np.int16) + eps
    return np.clip(np.rint(adv), np.maximum(lo, 0), np.minimum(hi, 255)).astype(np.uint8)


def corrupted_images(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    from imagecorruptions import corrupt, get_corruption_names

    if name not in get_corruption_names("all"):
        raise ValueError(f"corruption {name!r} is not one of {get_corruption_names('all')}")
    np.random.seed(seed)  # imagecorruptions draws from numpy's global generator
    return np.stack([np.asarray(corrupt(im, corruption_name=name, severity=severity), dtype=np.uint8)
                     for im in images])


class InputCache:
    """Images for each condition's tag, cached under ``root``."""

    def __init__(self, root: str | os.PathLike, checkpoint: str, images: np.ndarray, labels: np.ndarray | None = None,
                 attack_steps: int = 20, attack_eot: int = 4, seed: int = 0, defend_eps: int = 8) -> None:
        from models.checkpoint import read_checkpoint

        self.root = Path(root)
        self.checkpoint = checkpoint
        self.images, self.labels = images, labels
        self.steps, self.eot, self.seed, self.defend_eps = attack_steps, attack_eot, seed, defend_eps
        self.fingerprint = read_checkpoint(checkpoint)["manifest"]["fingerprint"]
        self.key = hashlib.sha256(self.fingerprint.encode() + images.tobytes()).hexdigest()[:16]

    def images_for(self, tag: str) -> tuple[np.ndarray, Condition]:
        """uint8 NHWC images the edge starts from (for ``defended:*``, the attacked images it will defend)."""
        cond = parse_tag(tag, self.defend_eps)
        if cond.kind == "clean":
            return self.images, cond
        if cond.kind == "defended":
            return self.images_for(cond.source)[0], cond
        if cond.kind == "attack":
            path = self.root / f"attack-{cond.name}-{cond.level}-s{self.steps}-e{self.eot}-{self.key}.npz"
            return cached(path, lambda: attacked_images(self.checkpoint, self.images, cond.name, cond.level,
                                                        self.steps, self.eot, self.seed, self.labels)), cond
        path = self.root / f"corruption-{cond.name}-{cond.level}-{self.key}.npz"
        return cached(path, lambda: corrupted_images(self.images, cond.name, cond.level, self.seed)), cond
