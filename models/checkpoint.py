"""Checkpoint files: weights plus a manifest that says what they are.

A checkpoint is a ``torch.save`` dict ``{"format": FORMAT, "manifest": {...}, "state_dict": {...}}``. Bundled
checkpoints live in ``models/checkpoints/<name>.pt`` and are addressed by name (``default-fp``, ``default-mshp``).
Files are written atomically (temp file + rename) so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "splitinfer-checkpoint/1"
BUNDLED_DIR = Path(__file__).resolve().parent / "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint path or file that cannot be used, with the reason."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | os.PathLike, state_dict: dict, manifest: dict) -> None:
    """Write weights + manifest atomically, and the manifest alone as ``<path>.json`` for people and tools."""
    atomic_torch_save({"format": FORMAT, "manifest": manifest, "state_dict": state_dict}, path)
    side = Path(str(path) + ".json")
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, side)


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.pt"))


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A bundled name (``default-mshp``) or a file path -> an existing file path."""
    s = str(name_or_path)
    bundled = BUNDLED_DIR / f"{s}.pt"
    if "/" not in s and not s.endswith(".pt") and bundled.exists():
        return bundled
    path = Path(s)
    if path.is_file():
        return path
    known = ", ".join(bundled_names()) or "none"
    raise CheckpointError(f"checkpoint not found: {s!r} (not a file, not a bundled name; bundled: {known})")


def read_checkpoint(name_or_path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint file; errors name the file and what is wrong with it."""
    path = resolve_checkpoint(name_or_path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a corrupt or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a splitinfer checkpoint (missing format marker {FORMAT!r})")
    if not isinstance(obj.get("manifest"), dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: checkpoint lacks its manifest or weights")
    obj["path"] = str(path)
    return obj


def load_backbone_checkpoint(name_or_path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """A trained teacher backbone and its manifest."""
    from .backbones import build_backbone

    ck = read_checkpoint(name_or_path)
    man = ck["manifest"]
    if man.get("kind") != "backbone":
        raise CheckpointError(f"{ck['path']}: expected a backbone checkpoint, found kind={man.get('kind')!r}")
    model = build_backbone(man["arch"], len(man["classes"]))
    model.load_state_dict(ck["state_dict"])
    return model, man
