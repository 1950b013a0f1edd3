"""Experiment campaigns: models × attacks × ε × corruptions × severities × defenses, measured in REAL coded bytes.

Why a campaign engine and not a notebook: the paper's claims (the entropy attack grows the coded stream far more than
an accuracy attack or noise of the same budget; corruptions move it both ways; the object-aware defense brings it
back at little accuracy cost) are grids of dozens of cells over many models, each cell minutes of PGD on two CPU
cores. A grid like that must survive interruptions and reruns, and every number in it must be the length of a byte
string the codec actually wrote (never ``-log2 p`` of the likelihood), classified from the *decoded* latent.

So every cell (one model, one input condition, one defense) is computed once and stored as an atomic JSON file under
``OUT/cells/``; attacked and corrupted inputs are computed once per model/condition and stored losslessly as uint8
under ``OUT/cache/`` (what a camera, and so an attacker, delivers); models a ``train:`` block asks for are trained
resumably into ``OUT/models/``. A rerun with ``resume`` skips everything already finished. The outputs are
``results.csv`` / ``results.json`` (one row per cell), ``tables.md`` (shaped like the paper's tables), plots (PNG)
and, for a ``headline:`` block, ``headline.json`` / ``headline.md`` with the issue's targets checked.

The same building blocks serve ``splitinfer attack`` and ``splitinfer corrupt`` (``splitinfer.resilience_cli``):
attack batches are seeded by their first image's index and corruptions by the image's relative path, so the CLI's
PNG trees and the campaign's caches hold the same pixels for the same settings.

Run: ``splitinfer campaign --preset small`` or ``python -m resilience.campaign --config FILE --out DIR --resume``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from models.data import ImageSet

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_DATA = "../shared/datasets/cifar10/test"
DEFAULT_STEPS = 20
DEFAULT_ENTROPY_EOT = 16  # the paper's expectation over 16 draws of the quantization proxy
KB = 1024.0  # the paper's KB

# every attack in resilience.attacks.ATTACKS, with the keywords it accepts beyond (model, x, labels, eps)
_PGD_KW = ("steps", "alpha", "eot_iter", "random_start", "seed")
ATTACK_KEYWORDS: dict[str, tuple[str, ...]] = {
    "entropy_pgd": _PGD_KW,
    "entropy_pgd_l2": _PGD_KW,
    "accuracy_pgd": (*_PGD_KW, "latent"),
    "sign_noise": ("seed",),
    "lowfreq_pgd": (*_PGD_KW, "keep"),
    "region_pgd": (*_PGD_KW, "region"),
    "adaptive_pgd": (*_PGD_KW, "defense", "defense_kw"),
}
L2_ATTACKS = {"entropy_pgd_l2"}


# ============================================================================================== atomic files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``: a reader (or a resumed run) sees either
    the old file or the whole new one, never half of it. The temp name does not end in an image suffix, so an
    ImageFolder listing never picks it up."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """uint8 HWC RGB as a lossless PNG, atomically (attacked pixels must survive the round trip exactly)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def resolve_path(p: str | os.PathLike, base: Path = PROJECT_ROOT) -> Path:
    """Relative paths in configs are relative to the project root (so presets work from any working dir)."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else (base / path)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (uncommitted changes present)" if dirty.stdout.strip() else "")


# ==================================================================================================== images
def load_images(data: str | os.PathLike, size: int, limit: int | None, per_class: bool = True) -> ImageSet:
    """An ImageSet (uint8 NHWC) from an ImageFolder tree; ``limit`` spread over the classes by default, so that a
    200-image cell still sees every class (``load_image_folder``'s plain limit takes the first classes only)."""
    from models.data import load_image_folder

    root = resolve_path(data)
    if not root.is_dir():
        raise ValueError(f"data directory not found: {root}")
    return load_image_folder(root, size, limit, per_class=per_class and limit is not None)


def data_key(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:12]


# =================================================================================================== attacks
def attack_kwargs(attack: str, steps: int | None = None, eot: int | None = None, alpha: float | None = None,
                  random_start: bool = False, defense: str | None = None, defense_params: dict | None = None,
                  params: dict | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ATTACKS[attack]`` (``seed`` excluded: it is set per batch). ``alpha`` in 1/255.

    ``eot`` None keeps the library's own default per attack: 16 for the entropy attacks (the paper's), 1 for the
    accuracy attack (its noise proxy needs no averaging to be a strong baseline, and each draw costs a whole tail
    pass). Raises ValueError for keywords the attack does not take."""
    from resilience.attacks import ATTACKS

    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {', '.join(sorted(ATTACKS))}")
    accepted = ATTACK_KEYWORDS.get(attack, _PGD_KW)
    kw: dict[str, Any] = {}
    if "steps" in accepted:
        kw["steps"] = DEFAULT_STEPS if steps is None else int(steps)
        if kw["steps"] < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if eot is not None:
            if int(eot) < 1:
                raise ValueError(f"eot must be >= 1, got {eot}")
            kw["eot_iter"] = int(eot)
        if alpha is not None:
            if alpha <= 0:
                raise ValueError(f"alpha must be > 0, got {alpha}")
            kw["alpha"] = float(alpha) / 255.0
        if random_start:
            kw["random_start"] = True
    if defense is not None or defense_params:
        if attack != "adaptive_pgd":
            raise ValueError(f"a defense is only taken by the adaptive attack (adaptive_pgd), not by {attack!r}")
    if attack == "adaptive_pgd":
        from resilience.defenses import DEFENSES

        name = defense or "object_tv"
        if name not in DEFENSES:
            raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
        kw["defense"], kw["defense_kw"] = name, resolved_defense_params(name, defense_params)
    for key, value in (params or {}).items():
        if key not in accepted or key in ("seed", "defense", "defense_kw"):
            extra = sorted(set(accepted) - set(_PGD_KW) - {"defense", "defense_kw"})
            raise ValueError(f"attack {attack!r} takes no parameter {key!r} (extra parameters it takes: "
                             f"{', '.join(extra) or 'none'})")
        kw[key] = value
    return kw


def _signature_defaults(fn: Callable, skip: tuple[str, ...]) -> dict[str, Any]:
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and k not in skip}


def resolved_defense_params(name: str, params: dict | None = None) -> dict[str, Any]:
    """Every parameter the defense will run with (its defaults filled in), so that cache keys and reports name the
    defense completely: a later change of a default makes new cells instead of silently reusing old ones."""
    from resilience import defenses as D

    if name not in D.DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(sorted(D.DEFENSES))}")
    fns: dict[str, Callable] = {"object_tv": D.object_aware_tv, "tv": D.tv_denoise, "jpeg": D.jpeg_reencode,
                                "bit_depth": D.bit_depth, "median": D.median_filter, "gaussian": D.gaussian_blur}
    params = dict(params or {})
    if name not in fns:
        if params:
            raise ValueError(f"defense {name!r} takes no parameters")
        return {}
    out = _signature_defaults(fns[name], ("model", "x", "codec"))
    unknown = sorted(set(params) - set(out))
    if unknown:
        raise ValueError(f"defense {name!r} takes no parameter(s) {', '.join(map(repr, unknown))}; it takes: "
                         f"{', '.join(sorted(out))}")
    out.update(params)
    if name in ("object_tv", "tv"):  # the solver's tuned defaults, and a clear error for bad combinations
        out.update(D.tv_settings(out.pop("weight"), out.pop("chroma_weight"), out.pop("solver"), out.pop("color")))
    return out


def resolved_attack_params(attack: str, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` plus the attack function's own defaults (eot_iter, alpha=None meaning eps/4, ...), for keys and rows."""
    from resilience import attacks as A

    fns: dict[str, Callable] = {"entropy_pgd": A.entropy_pgd, "entropy_pgd_l2": A.entropy_pgd,
                                "accuracy_pgd": A.accuracy_pgd, "sign_noise": A.sign_noise,
                                "lowfreq_pgd": A.lowfreq_pgd, "region_pgd": A.entropy_pgd,
                                "adaptive_pgd": A.adaptive_pgd}
    out = _signature_defaults(fns[attack], ("model", "x", "labels", "eps", "seed", "weight", "defense"))
    if attack == "entropy_pgd_l2":
        out["norm"] = "l2"
    if attack == "region_pgd":
        out["region"] = "center"
    if attack == "lowfreq_pgd":
        out.pop("norm", None)
    out.update(kw)
    if attack == "adaptive_pgd":
        out["defense_kw"] = resolved_defense_params(out["defense"], out.get("defense_kw"))
    return out


def to_uint8(adv: np.ndarray, images: np.ndarray, eps: float, norm: str = "linf") -> np.ndarray:
    """Float [0, 1] NHWC attack output -> the uint8 image an attacker would deliver: rounded, and for L∞ kept
    inside the integer ε-ball (rounding could otherwise step 1/255 outside it)."""
    out = np.rint(np.asarray(adv, dtype=np.float64) * 255.0)
    if norm == "linf":
        base = images.astype(np.float64)
        out = np.clip(out, np.ceil(base - eps - 1e-9), np.floor(base + eps + 1e-9))
    return np.clip(out, 0, 255).astype(np.uint8)


def attack_batch(model, images: np.ndarray, labels: np.ndarray, attack: str, eps: float, kw: dict[str, Any],
                 seed: int) -> np.ndarray:
    """One batch of uint8 NHWC images -> attacked uint8 NHWC (``eps`` in 1/255)."""
    import torch

    from models.data import to_tensor
    from resilience.attacks import ATTACKS

    x = to_tensor(images)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    adv = ATTACKS[attack](model, x, y, eps / 255.0, seed=seed, **kw)
    return to_uint8(adv.permute(0, 2, 3, 1).numpy(), images, eps, "l2" if attack in L2_ATTACKS else "linf")


def iter_attack(model, images: np.ndarray, labels: np.ndarray, attack: str, eps: float, kw: dict[str, Any],
                seed: int = 0, batch: int = 50, skip: Callable[[int, int], bool] | None = None,
                progress: bool = True, desc: str | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Attack in batches, yielding ``(start, adversarial uint8 batch)``. Batch ``[start, start+batch)`` is seeded
    with ``seed + start`` (as ``splitinfer.inputs`` does), so a resumed run that skips finished batches
    (``skip(start, stop)``) produces exactly the images an uninterrupted run would have."""
    from tqdm import tqdm

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    bar = tqdm(total=len(images), desc=desc or f"{attack} {eps:g}/255", unit="img", disable=not progress,
               dynamic_ncols=True, leave=False, mininterval=1.0)
    try:
        for start in range(0, len(images), batch):
            stop = min(start + batch, len(images))
            if skip is None or not skip(start, stop):
                yield start, attack_batch(model, images[start:stop], labels[start:stop], attack, eps, kw,
                                          seed + start)
            bar.update(stop - start)
    finally:
        bar.close()


# =============================================================================================== corruptions
def corruption_names() -> list[str]:
    """The 15 ImageNet-C corruptions and the 4 extras, as imagecorruptions names them."""
    from imagecorruptions import get_corruption_names

    return list(get_corruption_names("all"))


def parse_corruptions(value: str | list[str]) -> list[str]:
    known = corruption_names()
    names = known if value == "all" or value == ["all"] else ([value] if isinstance(value, str) else list(value))
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown corruption(s) {', '.join(map(repr, bad))}; known: all, {', '.join(known)}")
    return names


def parse_severities(value: str | int | list) -> list[int]:
    if value == "all" or value == ["all"]:
        return [1, 2, 3, 4, 5]
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        try:
            s = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"severity {v!r}: expected an integer 1-5 or 'all'") from None
        if not 1 <= s <= 5 or str(v).strip() != str(s):
            raise ValueError(f"severity {v!r}: expected an integer 1-5 or 'all'")
        out.append(s)
    return out


def corruption_seed(seed: int, name: str, severity: int, key: str) -> int:
    """Per-image seed: imagecorruptions draws from numpy's global generator, so each image gets its own stable
    seed (from its relative path), independent of the order or the subset in which images are processed."""
    return zlib.crc32(f"{seed}|{name}|{severity}|{key}".encode()) & 0xFFFFFFFF


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    from imagecorruptions import corrupt

    np.random.seed(seed)
    out = np.asarray(corrupt(image, corruption_name=name, severity=severity))
    if out.shape != image.shape:
        raise RuntimeError(f"corruption {name} at severity {severity} changed the image shape {image.shape} -> "
                           f"{out.shape}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out


def corrupt_images(images: np.ndarray, keys: list[str], name: str, severity: int, seed: int) -> np.ndarray:
    return np.stack([corrupt_image(im, name, severity, corruption_seed(seed, name, severity, k))
                     for im, k in zip(images, keys, strict=True)])


# =============================================================================================== measurement
def measure(model, x, labels: np.ndarray, batch: int = 100, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Real coded bytes and correctness per image, on the deployed path (as ``models.evaluate.evaluate_split``):
    head -> ``CodecModel.encode`` (each image its own stream) -> bytes -> decode -> tail on the DECODED latent.

    ``x``: uint8 NHWC images or a float NCHW [0, 1] tensor (a defense's output is encoded unrounded, as the edge
    does). ``verify`` decodes every stream and checks it against the encoded symbols (cheap next to PGD)."""
    import torch

    from models.data import to_tensor
    from models.evaluate import LosslessError

    codec = _codec_of(model)
    n = len(labels)
    real = np.zeros(n, dtype=np.int64)
    correct = np.zeros(n, dtype=bool)
    with torch.no_grad():
        for i in range(0, n, batch):
            xb = x[i:i + batch]
            xb = to_tensor(xb) if isinstance(xb, np.ndarray) else xb
            y = model.encode_latent(xb)
            z = model.entropy.side_latent(y)
            y_np, z_np = y.numpy(), None if z is None else z.numpy()
            y_hat = np.empty_like(y_np)
            for j in range(len(y_np)):
                enc = codec.encode(y_np[j], None if z_np is None else z_np[j])
                real[i + j] = len(enc.data)
                expected = codec.dequantize(enc.symbols)
                if verify:
                    y_hat[j] = codec.decode(enc.data, enc.index_checksum)
                    if not np.array_equal(y_hat[j], expected):
                        raise LosslessError(f"decoded latent of image {i + j} differs from the encoded one")
                else:
                    y_hat[j] = expected
            logits = model.decode_tail(torch.from_numpy(y_hat))
            correct[i:i + len(y_np)] = logits.argmax(1).numpy() == labels[i:i + len(y_np)]
    return real, correct


_CODECS: dict[int, Any] = {}


def _codec_of(model) -> Any:
    """One CodecModel per loaded model (building it costs ~0.2 s and it never changes)."""
    key = id(model)
    if key not in _CODECS:
        _CODECS[key] = model.codec_model()
    return _CODECS[key]


def apply_defense(model, images: np.ndarray, name: str, params: dict, batch: int = 50):
    """The defense the edge runs before encoding, on uint8 NHWC images; returns float NCHW (unrounded)."""
    import torch

    from models.data import to_tensor
    from resilience.defenses import DEFENSES

    return torch.cat([DEFENSES[name](model, to_tensor(images[i:i + batch]), **params)
                      for i in range(0, len(images), batch)])


# ==================================================================================================== config
class ConfigError(ValueError):
    """A campaign config that cannot be run; the message names the bad field."""


TOP_KEYS = {"name", "description", "data", "images", "per_class", "seed", "batch", "threads", "verify", "models",
            "train", "attacks", "corruptions", "defenses", "headline"}
ATTACK_KEYS = {"name", "eps", "steps", "eot", "alpha", "random_start", "params", "defense", "defense_params"}
CORRUPTION_KEYS = {"name", "severity"}
DEFENSE_KEYS = {"name", "params", "apply_to"}  # not "on": YAML 1.1 reads that key as True
DEFENSE_TARGETS = ("clean", "attacks", "corruptions")
TRAIN_KEYS = {"data", "families", "priors", "betas", "epochs", "limit", "lr", "adam_lr", "fit_prior_epochs",
              "batch_size", "seed", "init", "base", "note"}
BASE_KEYS = {"epochs", "limit", "beta", "lr", "adam_lr"}
HEADLINE_KEYS = {"model", "attack", "eps", "baselines", "defense", "defend_eps", "adaptive", "adaptive_eps",
                 "min_attack_delta_pct", "max_accuracy_drop_pt"}


@dataclass
class AttackSpec:
    name: str
    eps: list[float]
    steps: int | None = None
    eot: int | None = None
    alpha: float | None = None
    random_start: bool = False
    params: dict = field(default_factory=dict)
    defense: str | None = None
    defense_params: dict | None = None

    def kwargs(self) -> dict[str, Any]:
        return attack_kwargs(self.name, self.steps, self.eot, self.alpha, self.random_start, self.defense,
                             self.defense_params, self.params)


@dataclass
class DefenseSpec:
    name: str
    params: dict = field(default_factory=dict)
    apply_to: tuple[str, ...] = ("clean", "attacks")


@dataclass
class TrainSpec:
    """Models the campaign trains itself: families × priors × betas, short runs (see ``train_models``)."""

    data: str = "../shared/datasets/cifar10/train"
    families: list[str] = field(default_factory=lambda: ["resnet"])
    priors: list[str] = field(default_factory=lambda: ["fp", "mshp"])
    betas: list[float] = field(default_factory=lambda: [0.08])
    epochs: int = 1
    limit: int | None = None
    lr: float = 0.05
    adam_lr: float = 5e-4
    fit_prior_epochs: int = 1
    batch_size: int = 256
    seed: int = 0
    init: dict = field(default_factory=dict)  # family -> {prior: checkpoint}
    base: dict = field(default_factory=dict)  # FP base model per family without init: epochs, limit, beta, lr...
    note: str = ""


@dataclass
class CampaignConfig:
    name: str = "campaign"
    description: str = ""
    data: str = DEFAULT_DATA
    images: int = 200
    per_class: bool = True
    seed: int = 0
    batch: int = 50
    threads: int | None = None
    verify: bool = True
    models: list[str] = field(default_factory=list)
    train: TrainSpec | None = None
    attacks: list[AttackSpec] = field(default_factory=list)
    corruptions: list[tuple[str, int]] = field(default_factory=list)
    defenses: list[DefenseSpec] = field(default_factory=list)
    headline: dict | None = None
    source: str = ""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_keys(obj: Any, known: set[str], where: str) -> dict:
    _need(isinstance(obj, dict), f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(str(k) for k in set(obj) - known)
    _need(not unknown, f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return obj


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _positive_int(v: Any, where: str, allow_none: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    _need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{where}: expected a positive integer, got {v!r}")
    return int(v)


def _number(v: Any, where: str, positive: bool = True) -> float:
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive),
          f"{where}: expected a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def parse_config(raw: dict, source: str = "<dict>") -> CampaignConfig:
    """Validate a config mapping (from YAML) into a CampaignConfig; every error names the offending field."""
    from resilience.attacks import ATTACKS
    from resilience.defenses import DEFENSES

    raw = _check_keys(raw, TOP_KEYS, "config")
    cfg = CampaignConfig(source=source)
    cfg.name = str(raw.get("name", Path(source).stem if source != "<dict>" else "campaign"))
    cfg.description = str(raw.get("description", ""))
    cfg.data = str(raw.get("data", DEFAULT_DATA))
    cfg.images = _positive_int(raw.get("images", 200), "images")
    cfg.per_class = bool(raw.get("per_class", True))
    seed = raw.get("seed", 0)
    _need(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, f"seed: expected an integer >= 0, "
          f"got {seed!r}")
    cfg.seed = seed
    cfg.batch = _positive_int(raw.get("batch", 50), "batch")
    cfg.threads = _positive_int(raw.get("threads"), "threads", allow_none=True)
    cfg.verify = bool(raw.get("verify", True))

    models = raw.get("models", [])
    _need(isinstance(models, list) and all(isinstance(m, str) and m for m in models),
          "models: expected a list of bundled checkpoint names or checkpoint paths")
    cfg.models = list(models)
    if raw.get("train") is not None:
        cfg.train = _parse_train(raw["train"])
    _need(bool(cfg.models) or cfg.train is not None, "models: give at least one model (or a train: block)")

    attacks = raw.get("attacks", [])
    _need(isinstance(attacks, list), "attacks: expected a list")
    for i, a in enumerate(attacks):
        where = f"attacks[{i}]"
        a = {"name": a} if isinstance(a, str) else a
        _check_keys(a, ATTACK_KEYS, where)
        _need(a.get("name") in ATTACKS, f"{where}.name: {a.get('name')!r} is not an attack; known: "
              f"{', '.join(sorted(ATTACKS))}")
        _need("eps" in a, f"{where}.eps: required (list of budgets in 1/255)")
        eps = [_number(e, f"{where}.eps") for e in _as_list(a["eps"])]
        spec = AttackSpec(a["name"], eps, a.get("steps"), a.get("eot"), a.get("alpha"), bool(a.get("random_start")),
                          dict(a.get("params") or {}), a.get("defense"), a.get("defense_params"))
        try:
            spec.kwargs()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        cfg.attacks.append(spec)

    corr = raw.get("corruptions", [])
    _need(isinstance(corr, list), "corruptions: expected a list of {name, severity}")
    for i, c in enumerate(corr):
        where = f"corruptions[{i}]"
        _check_keys(c, CORRUPTION_KEYS, where)
        _need("name" in c and "severity" in c, f"{where}: needs name and severity")
        try:
            names, sevs = parse_corruptions(c["name"]), parse_severities(c["severity"])
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        cfg.corruptions += [(n, s) for n in names for s in sevs if (n, s) not in cfg.corruptions]

    defenses = raw.get("defenses", [])
    _need(isinstance(defenses, list), "defenses: expected a list")
    for i, d in enumerate(defenses):
        where = f"defenses[{i}]"
        d = {"name": d} if isinstance(d, str) else d
        _check_keys(d, DEFENSE_KEYS, where)
        _need(d.get("name") in DEFENSES and d.get("name") != "none", f"{where}.name: {d.get('name')!r} is not a "
              f"defense; known: {', '.join(sorted(set(DEFENSES) - {'none'}))}")
        on = tuple(_as_list(d.get("apply_to", ["clean", "attacks"])))
        _need(all(t in DEFENSE_TARGETS for t in on), f"{where}.apply_to: expected a subset of "
              f"{list(DEFENSE_TARGETS)}")
        params = d.get("params") or {}
        _need(isinstance(params, dict), f"{where}.params: expected a mapping")
        try:
            params = resolved_defense_params(d["name"], params)
        except ValueError as exc:
            raise ConfigError(f"{where}.params: {exc}") from None
        cfg.defenses.append(DefenseSpec(d["name"], params, on))

    if raw.get("headline") is not None:
        h = _check_keys(raw["headline"], HEADLINE_KEYS, "headline")
        cfg.headline = dict(h)
    return cfg


def _parse_train(t: Any) -> TrainSpec:
    from models.backbones import get_spec

    _check_keys(t, TRAIN_KEYS, "train")
    spec = TrainSpec(**{k: v for k, v in t.items() if k not in ("init", "base")})
    spec.families = [str(f) for f in _as_list(spec.families)]
    for f in spec.families:
        try:
            get_spec(f)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"train.families: {f!r} is not a model family ({exc})") from None
    spec.priors = [str(p) for p in _as_list(spec.priors)]
    _need(spec.priors and all(p in ("fp", "mshp") for p in spec.priors), "train.priors: expected fp and/or mshp")
    spec.betas = [_number(b, "train.betas") for b in _as_list(spec.betas)]
    spec.epochs = _positive_int(spec.epochs, "train.epochs")
    spec.limit = _positive_int(spec.limit, "train.limit", allow_none=True)
    spec.fit_prior_epochs = int(spec.fit_prior_epochs or 0)
    spec.batch_size = _positive_int(spec.batch_size, "train.batch_size")
    spec.lr, spec.adam_lr = _number(spec.lr, "train.lr"), _number(spec.adam_lr, "train.adam_lr")
    init = t.get("init") or {}
    _need(isinstance(init, dict), "train.init: expected {family: {prior: checkpoint}}")
    for fam, per in init.items():
        _need(fam in spec.families, f"train.init: {fam!r} is not one of train.families")
        _need(isinstance(per, dict) and all(p in ("fp", "mshp") for p in per),
              f"train.init.{fam}: expected {{fp: checkpoint, mshp: checkpoint}}")
    spec.init = init
    base = t.get("base") or {}
    _check_keys(base, BASE_KEYS, "train.base")
    spec.base = dict(base)
    needs_base = [f for f in spec.families for p in spec.priors if not init.get(f, {}).get(p)]
    _need(not needs_base or base, f"train.base: required for families without an init checkpoint ("
          f"{', '.join(sorted(set(needs_base)))})")
    return spec


def load_config(path: str | os.PathLike) -> CampaignConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if raw is None:
        raise ConfigError(f"{p}: empty config")
    return parse_config(raw, str(p))


def preset_path(name: str) -> Path:
    p = PRESETS_DIR / f"{name}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(q.stem for q in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name!r}; known: {known}")
    return p


# ================================================================================================== training
@dataclass
class ModelEntry:
    """A model the campaign measures: display name, checkpoint (bundled name or path) and manifest facts."""

    name: str
    checkpoint: str
    arch: str = ""
    prior: str = ""
    beta: float | None = None
    trained_here: bool = False


def balanced_subset(root: Path, limit: int | None, dest: Path) -> Path:
    """An ImageFolder tree of ``limit`` images spread over the classes, as symlinks (no copies).

    Why: ``train --limit`` keeps the first N images, and an ImageFolder listing is sorted by class, so a limit of
    5,000 on CIFAR-10 train would be one class only. Built in a temp folder and renamed, so it is whole or absent."""
    from splitinfer.images import list_image_folder

    if limit is None:
        return root
    final = dest / f"{root.name}-{limit}-per-class"
    if final.is_dir():
        return final
    items, classes = list_image_folder(root)
    by_class: dict[int, list[str]] = {}
    for rel, c in items:
        by_class.setdefault(c, []).append(rel)
    picked: list[str] = []
    i = 0
    while len(picked) < min(limit, len(items)):
        for c in sorted(by_class):
            if i < len(by_class[c]) and len(picked) < limit:
                picked.append(by_class[c][i])
        i += 1
    tmp = dest / f".{final.name}.{os.getpid()}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    for rel in picked:
        link = tmp / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((root / rel).resolve(), link)
    os.replace(tmp, final)
    return final


def train_models(spec: TrainSpec, out: Path, threads: int | None = None, log: Callable[[str], None] = print
                 ) -> list[ModelEntry]:
    """Train families × priors × betas into ``out`` (resumable: finished checkpoints are skipped, unfinished runs
    resume from their last epoch through ``models.train``).

    Each model starts from ``init[family][prior]`` when given (e.g. the bundled checkpoints for ``resnet``), else
    from a short-trained FP *base* model of its family (trained first, once). MSHP models started from an FP model
    first fit the hyperprior to the frozen encoder (``fit_prior_epochs``), then all models train ``epochs`` end to
    end at their own β. These are SHORT-TRAINED models (a few thousand images, one or two epochs): enough for the
    β trade-off and the attack's effect to show, not converged accuracy."""
    from models.checkpoint import read_checkpoint
    from models.train import TrainConfig, train_split

    out.mkdir(parents=True, exist_ok=True)
    data_root = resolve_path(spec.data)
    if not data_root.is_dir():
        raise ConfigError(f"train.data: directory not found: {data_root}")
    train_data = balanced_subset(data_root, spec.limit, out / "data")
    entries: list[ModelEntry] = []

    def run(cfg: TrainConfig) -> None:
        t0 = time.time()
        log(f"training {Path(cfg.out).name} ({cfg.arch}, {cfg.prior}, beta={cfg.beta}, {cfg.epochs} epoch(s) on "
            f"{cfg.data}, init {cfg.extra.get('init') or 'none'})")
        train_split(cfg)
        log(f"trained {Path(cfg.out).name} in {time.time() - t0:.0f} s")

    for family in spec.families:
        inits = dict(spec.init.get(family, {}))
        base_path = out / f"base-{family}-fp.pt"
        if any(not inits.get(p) for p in spec.priors) and not base_path.exists():
            b = spec.base
            base_data = balanced_subset(data_root, b.get("limit", spec.limit), out / "data")
            run(TrainConfig(arch=family, data=str(base_data), out=str(base_path), epochs=int(b.get("epochs", 1)),
                            batch_size=spec.batch_size, lr=float(b.get("lr", 0.2)), seed=spec.seed, threads=threads,
                            prior="fp", beta=float(b.get("beta", 0.08)), adam_lr=float(b.get("adam_lr", 2e-3)),
                            extra={"init": None}))
        for prior in spec.priors:
            init = inits.get(prior) or str(base_path)
            init_prior = read_checkpoint(init)["manifest"].get("prior")
            for beta in spec.betas:
                name = f"{family}-{prior}-b{beta:g}"
                path = out / f"{name}.pt"
                if not (path.exists() and Path(str(path) + ".json").exists()):
                    run(TrainConfig(arch=family, data=str(train_data), out=str(path), epochs=spec.epochs,
                                    batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, threads=threads,
                                    prior=prior, beta=beta, adam_lr=spec.adam_lr,
                                    distill_epochs=spec.fit_prior_epochs if init_prior != prior else 0,
                                    extra={"init": init}))
                entries.append(ModelEntry(name, str(path), family, prior, beta, trained_here=True))
    return entries


# ===================================================================================================== cells
@dataclass(frozen=True)
class Cell:
    """One measurement: a model's images under one condition (clean / attack / corruption), one defense."""

    kind: str  # clean | attack | corruption
    name: str  # "clean", the attack or the corruption
    level: float  # eps in 1/255 or severity (0 for clean)
    defense: str = "none"

    @property
    def label(self) -> str:
        cond = "clean" if self.kind == "clean" else f"{self.name}@{self.level:g}"
        return cond if self.defense == "none" else f"{cond}+{self.defense}"

    def slug(self) -> str:
        return self.label.replace("@", "-").replace("+", "--")


def plan_cells(cfg: CampaignConfig) -> list[tuple[Cell, AttackSpec | None, DefenseSpec | None]]:
    """Every cell of one model, in an order that computes each attacked input once before its defended cells."""
    cells: list[tuple[Cell, AttackSpec | None, DefenseSpec | None]] = [(Cell("clean", "clean", 0), None, None)]
    for d in cfg.defenses:
        if "clean" in d.apply_to:
            cells.append((Cell("clean", "clean", 0, d.name), None, d))
    for a in cfg.attacks:
        for eps in a.eps:
            cells.append((Cell("attack", a.name, eps), a, None))
            defs = [d for d in cfg.defenses if "attacks" in d.apply_to]
            if a.name == "adaptive_pgd":  # its own target defense is always measured
                kw = a.kwargs()
                if all(d.name != kw["defense"] for d in defs):
                    defs.append(DefenseSpec(kw["defense"], kw["defense_kw"]))
            cells += [(Cell("attack", a.name, eps, d.name), a, d) for d in defs]
    for name, sev in cfg.corruptions:
        cells.append((Cell("corruption", name, sev), None, None))
        cells += [(Cell("corruption", name, sev, d.name), None, d) for d in cfg.defenses if "corruptions" in d.apply_to]
    return cells


def _adaptive_defense_params(a: AttackSpec, cfg: CampaignConfig) -> AttackSpec:
    """An adaptive attack without its own defense_params targets the defense exactly as the campaign configures it."""
    if a.name != "adaptive_pgd" or a.defense_params:
        return a
    target = a.defense or "object_tv"
    for d in cfg.defenses:
        if d.name == target:
            return AttackSpec(**{**asdict(a), "defense_params": dict(d.params)})
    return a


class Campaign:
    """Runs a CampaignConfig into an output folder; ``stats`` counts computed vs cached cells."""

    def __init__(self, cfg: CampaignConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.cfg, self.out, self.resume, self.progress = cfg, Path(out), resume, progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stats = {"computed": 0, "cached": 0, "inputs_computed": 0, "inputs_cached": 0}
        self.computed_cells: list[str] = []

    # ------------------------------------------------------------------------------------------------- inputs
    def _attack_inputs(self, model, entry_fp: str, images: np.ndarray, labels: np.ndarray, dkey: str,
                       a: AttackSpec, eps: float) -> tuple[np.ndarray, float]:
        a = _adaptive_defense_params(a, self.cfg)
        kw = a.kwargs()
        key = _short_hash({"fp": entry_fp, "data": dkey, "attack": a.name, "eps": eps,
                           "kw": resolved_attack_params(a.name, kw), "seed": self.cfg.seed, "batch": self.cfg.batch})
        path = self.out / "cache" / f"attack-{a.name}-{eps:g}-{key}.npz"
        if path.exists():
            self.stats["inputs_cached"] += 1
            with np.load(path) as z:
                return z["images"], float(z["seconds"])
        t0 = time.time()
        adv = np.empty_like(images)
        for start, batch in iter_attack(model, images, labels, a.name, eps, kw, self.cfg.seed, self.cfg.batch,
                                        progress=self.progress, desc=f"  {a.name} {eps:g}/255"):
            adv[start:start + len(batch)] = batch
        seconds = time.time() - t0
        save_npz(path, images=adv, seconds=np.array(seconds))
        self.stats["inputs_computed"] += 1
        return adv, seconds

    def _corruption_inputs(self, images: np.ndarray, keys: list[str], dkey: str, name: str, sev: int
                           ) -> tuple[np.ndarray, float]:
        path = self.out / "cache" / f"corruption-{name}-{sev}-{dkey}-s{self.cfg.seed}.npz"
        if path.exists():
            self.stats["inputs_cached"] += 1
            with np.load(path) as z:
                return z["images"], float(z["seconds"])
        t0 = time.time()
        out = corrupt_images(images, keys, name, sev, self.cfg.seed)
        seconds = time.time() - t0
        save_npz(path, images=out, seconds=np.array(seconds))
        self.stats["inputs_computed"] += 1
        return out, seconds

    # --------------------------------------------------------------------------------------------------- run
    def models(self) -> list[ModelEntry]:
        from models.checkpoint import read_checkpoint

        entries = []
        for m in self.cfg.models:
            try:
                man = read_checkpoint(m if "/" not in m and not m.endswith(".pt") else resolve_path(m))["manifest"]
            except ValueError as exc:
                raise ConfigError(f"models: {exc}") from None
            name = m if "/" not in m and not m.endswith(".pt") else Path(m).stem
            ck = m if "/" not in m and not m.endswith(".pt") else str(resolve_path(m))
            entries.append(ModelEntry(name, ck, man.get("arch", ""), man.get("prior", ""), man.get("beta")))
        if self.cfg.train is not None:
            entries += train_models(self.cfg.train, self.out / "models", self.cfg.threads, self.log)
        return entries

    def _check_out(self) -> None:
        marker = self.out / "campaign.json"
        if marker.exists() and not self.resume:
            raise ValueError(f"{self.out} already holds a campaign; pass --resume to continue it (finished cells are "
                             "skipped) or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / ".gitignore", "# inputs and checkpoints are caches, not results\ncache/\n"
                          "models/\n")

    def run(self) -> list[dict]:
        """Train (if asked), measure every cell, write results and reports; returns the rows."""
        import torch

        from models.evaluate import load_split_model

        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self._check_out()
        t_start = time.time()
        meta = {"name": self.cfg.name, "config": self.cfg.source, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "git_commit": git_commit(), "torch_threads": torch.get_num_threads(), "finished": False,
                "resolved": _resolved(self.cfg), "previous_runs": _previous_runs(self.out / "campaign.json")}
        atomic_write_json(self.out / "campaign.json", meta)
        entries = self.models()
        rows: list[dict] = []
        data_cache: dict[int, Any] = {}
        plan = plan_cells(self.cfg)
        for entry in entries:
            model, man = load_split_model(entry.checkpoint)
            entry.arch, entry.prior = man["arch"], man["prior"]
            entry.beta = man.get("beta") if entry.beta is None else entry.beta
            size = model.spec.input_size
            if size not in data_cache:
                data_cache[size] = load_images(self.cfg.data, size, self.cfg.images, self.cfg.per_class)
            data = data_cache[size]
            dkey = data_key(data.images, data.labels)
            rows += self._run_model(model, man, entry, data, dkey, plan)
            _CODECS.pop(id(model), None)
        rows = add_deltas(rows)
        write_results(rows, self.out, self.cfg)
        meta.update(finished=True, seconds=round(time.time() - t_start, 1), stats=self.stats,
                    finished_at=time.strftime("%Y-%m-%d %H:%M:%S"), models=[asdict(e) for e in entries])
        atomic_write_json(self.out / "campaign.json", meta)
        return rows

    def _run_model(self, model, man: dict, entry: ModelEntry, data, dkey: str,
                   plan: list[tuple[Cell, AttackSpec | None, DefenseSpec | None]]) -> list[dict]:
        from tqdm import tqdm

        fp = man["fingerprint"]
        cell_dir = self.out / "cells" / entry.name
        rows = []
        bar = tqdm(plan, desc=entry.name, unit="cell", disable=not self.progress, dynamic_ncols=True)
        for cell, a, d in bar:
            bar.set_postfix_str(cell.label)
            # the key names what determines the numbers (not, e.g., the other budgets listed beside this one)
            spec = {"fingerprint": fp, "data": dkey, "images": len(data), "seed": self.cfg.seed,
                    "verify": self.cfg.verify, "cell": asdict(cell),
                    "attack": resolved_attack_params(a.name, _adaptive_defense_params(a, self.cfg).kwargs())
                    if a else None,
                    "batch": self.cfg.batch if a else None, "defense": [d.name, d.params] if d else None}
            key = _short_hash(spec)
            path = cell_dir / f"{cell.slug()}-{key}.json"
            if path.exists():
                row = json.loads(path.read_text())
                self.stats["cached"] += 1
            else:
                row = self._compute(model, entry, data, dkey, fp, cell, a, d)
                row["key"] = key
                atomic_write_json(path, row)
                self.stats["computed"] += 1
                self.computed_cells.append(f"{entry.name}/{cell.label}")
            rows.append(row)
        bar.close()
        return rows

    def _compute(self, model, entry: ModelEntry, data, dkey: str, fp: str, cell: Cell, a: AttackSpec | None,
                 d: DefenseSpec | None) -> dict:
        t0 = time.time()
        input_seconds = 0.0
        if cell.kind == "clean":
            images = data.images
        elif cell.kind == "attack":
            assert a is not None
            images, input_seconds = self._attack_inputs(model, fp, data.images, data.labels, dkey, a, cell.level)
        else:
            images, input_seconds = self._corruption_inputs(data.images, data.paths, dkey, cell.name,
                                                            int(cell.level))
        t_def = time.time()
        x = apply_defense(model, images, d.name, d.params, self.cfg.batch) if d is not None else images
        defense_seconds = time.time() - t_def if d is not None else 0.0
        real, correct = measure(model, x, data.labels, verify=self.cfg.verify)
        attack_info = {}
        if a is not None:
            kw = resolved_attack_params(a.name, _adaptive_defense_params(a, self.cfg).kwargs())
            attack_info = {"steps": kw.get("steps"), "eot": kw.get("eot_iter"),
                           "alpha_255": kw["alpha"] * 255 if kw.get("alpha") is not None else None,
                           "random_start": kw.get("random_start", False),
                           "attack_params": {k: v for k, v in kw.items() if k not in
                                             ("steps", "eot_iter", "alpha", "random_start")}}
        return {
            "model": entry.name, "arch": entry.arch, "prior": entry.prior, "beta": entry.beta,
            "fingerprint": fp[:16], "condition": cell.kind, "name": cell.name, "level": cell.level,
            "defense": cell.defense, "defense_params": d.params if d else {}, "label": cell.label,
            "images": int(len(real)), "bytes_mean": float(real.mean()), "bytes_median": float(np.median(real)),
            "bytes_p95": float(np.percentile(real, 95)), "bytes_max": int(real.max()),
            "kb_mean": float(real.mean() / KB), "accuracy": float(correct.mean()),
            "input_seconds": round(input_seconds, 2), "defense_seconds": round(defense_seconds, 2),
            "seconds": round(time.time() - t0, 2), **attack_info,
        }


def _previous_runs(path: Path) -> list[dict]:
    """Earlier runs into the same folder (a resumed campaign keeps the first run's timing and commit)."""
    if not path.exists():
        return []
    try:
        prev = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    keep = ("started", "finished_at", "finished", "seconds", "stats", "git_commit", "torch_threads")
    return [*prev.get("previous_runs", []), {k: prev.get(k) for k in keep}]


def _resolved(cfg: CampaignConfig) -> dict:
    d = asdict(cfg)
    d["corruptions"] = [list(c) for c in cfg.corruptions]
    return d


# =================================================================================================== reports
CSV_COLUMNS = ["model", "arch", "prior", "beta", "condition", "name", "level", "defense", "images", "bytes_mean",
               "kb_mean", "delta_pct", "delta_vs_undefended_pct", "bytes_median", "bytes_p95", "bytes_max",
               "accuracy", "accuracy_delta_pt", "clean_bytes_mean", "clean_accuracy", "steps", "eot", "seconds",
               "input_seconds", "defense_seconds", "fingerprint"]


def add_deltas(rows: list[dict]) -> list[dict]:
    """Δ% of real bytes and Δ accuracy (points) against the same model's clean, undefended cell; defended cells
    also get Δ% against the same input undefended."""
    clean = {r["model"]: r for r in rows if r["condition"] == "clean" and r["defense"] == "none"}
    undefended = {(r["model"], r["condition"], r["name"], r["level"]): r for r in rows if r["defense"] == "none"}
    out = []
    for r in rows:
        r = dict(r)
        c = clean.get(r["model"])
        if c is not None:
            r["clean_bytes_mean"], r["clean_accuracy"] = c["bytes_mean"], c["accuracy"]
            r["delta_pct"] = 100.0 * (r["bytes_mean"] / c["bytes_mean"] - 1.0)
            r["accuracy_delta_pt"] = 100.0 * (r["accuracy"] - c["accuracy"])
        u = undefended.get((r["model"], r["condition"], r["name"], r["level"]))
        if r["defense"] != "none" and u is not None:
            r["delta_vs_undefended_pct"] = 100.0 * (r["bytes_mean"] / u["bytes_mean"] - 1.0)
        out.append(r)
    return out


def write_results(rows: list[dict], out: Path, cfg: CampaignConfig) -> dict[str, Path]:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_json(out / "results.json", rows)
    atomic_write_text(out / "tables.md", markdown_tables(rows, cfg))
    files = {"csv": out / "results.csv", "json": out / "results.json", "tables": out / "tables.md"}
    files.update(write_plots(rows, out / "plots"))
    if cfg.headline:
        files.update(write_headline(rows, cfg, out))
    return files


def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:+.1f}%"


def _pt(v: float | None) -> str:
    return "–" if v is None else f"{v:+.1f} pt"


def _bkb(b: float | None) -> str:
    return "–" if b is None else f"{b:.1f} B ({b / KB:.3f} KB)"


def markdown_tables(rows: list[dict], cfg: CampaignConfig) -> str:
    """Tables shaped like the paper's: per model, each attack's ε against clean / attacked / defended real bytes and
    accuracy; an overview over models; and per-corruption Δ%."""
    lines = [f"# Campaign `{cfg.name}`: real coded bytes per image and top-1 accuracy", ""]
    if cfg.description:
        lines += [cfg.description.strip(), ""]
    models = list(dict.fromkeys(r["model"] for r in rows))
    n = rows[0]["images"] if rows else 0
    lines += [f"{n} images from `{cfg.data}` per cell; bytes are lengths of the real ANS streams (each image coded "
              "on its own, z and y in one stream for MSHP), 1 KB = 1024 B; Δ% against the same model's clean mean; "
              "accuracy is top-1 from the decoded latent. Attacked inputs are uint8 images inside the ε-ball.", ""]
    by_model = {m: [r for r in rows if r["model"] == m] for m in models}
    attacks = list(dict.fromkeys((r["name"]) for r in rows if r["condition"] == "attack"))
    defenses = list(dict.fromkeys(r["defense"] for r in rows if r["defense"] != "none"))

    # overview: one row per model
    eps_cols = [(a, lv) for a in attacks for lv in sorted({r["level"] for r in rows
                                                           if r["condition"] == "attack" and r["name"] == a})]
    if len(models) > 1 and eps_cols:
        lines += ["## Overview (Δ% real bytes vs clean; accuracy change in points)", ""]
        head = ["model", "arch", "prior", "β", "clean B", "clean acc"] + [f"{a} ε={lv:g}" for a, lv in eps_cols]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in models:
            rs = by_model[m]
            c = next((r for r in rs if r["condition"] == "clean" and r["defense"] == "none"), None)
            if c is None:
                continue
            cells = []
            for a, lv in eps_cols:
                r = next((r for r in rs if r["condition"] == "attack" and r["name"] == a and r["level"] == lv
                          and r["defense"] == "none"), None)
                cells.append("–" if r is None else f"{_pct(r.get('delta_pct'))} / {_pt(r.get('accuracy_delta_pt'))}")
            lines.append("| " + " | ".join([m, c["arch"], c["prior"], _f(c["beta"], "{:g}"), _f(c["bytes_mean"]),
                                             f"{100 * c['accuracy']:.1f}%", *cells]) + " |")
        lines.append("")

    for m in models:
        rs = by_model[m]
        c = next((r for r in rs if r["condition"] == "clean" and r["defense"] == "none"), None)
        if c is None:
            continue
        lines += [f"## {m} ({c['arch']}, {c['prior'].upper()}, β={_f(c['beta'], '{:g}')})", "",
                  f"Clean: {_bkb(c['bytes_mean'])} per image, top-1 {100 * c['accuracy']:.1f}%."]
        for d in defenses:
            cd = next((r for r in rs if r["condition"] == "clean" and r["defense"] == d), None)
            if cd:
                lines.append(f"Clean + {d}: {_bkb(cd['bytes_mean'])} ({_pct(cd.get('delta_pct'))}), top-1 "
                             f"{100 * cd['accuracy']:.1f}% ({_pt(cd.get('accuracy_delta_pt'))}).")
        lines.append("")
        for a in attacks:
            levels = sorted({r["level"] for r in rs if r["condition"] == "attack" and r["name"] == a})
            if not levels:
                continue
            head = ["ε (/255)", "clean", f"{a}", "Δ%", "acc attacked"]
            for d in defenses:
                head += [f"+{d}", "Δ% vs clean", f"acc +{d} (Δ vs clean)"]
            lines += [f"### {a}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for lv in levels:
                r = next((r for r in rs if r["condition"] == "attack" and r["name"] == a and r["level"] == lv
                          and r["defense"] == "none"), None)
                if r is None:
                    continue
                cells = [f"{lv:g}", _bkb(c["bytes_mean"]), _bkb(r["bytes_mean"]), _pct(r.get("delta_pct")),
                         f"{100 * r['accuracy']:.1f}% ({_pt(r.get('accuracy_delta_pt'))})"]
                for d in defenses:
                    rd = next((x for x in rs if x["condition"] == "attack" and x["name"] == a and x["level"] == lv
                               and x["defense"] == d), None)
                    cells += ["–", "–", "–"] if rd is None else [
                        _bkb(rd["bytes_mean"]), _pct(rd.get("delta_pct")),
                        f"{100 * rd['accuracy']:.1f}% ({_pt(rd.get('accuracy_delta_pt'))})"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")

    corr = list(dict.fromkeys((r["name"], r["level"]) for r in rows if r["condition"] == "corruption"))
    if corr:
        lines += ["## Corruptions (Δ% real bytes vs clean; accuracy in parentheses)", ""]
        head = ["corruption", "severity", *models]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, lv in corr:
            cells = []
            for m in models:
                r = next((r for r in by_model[m] if r["condition"] == "corruption" and r["name"] == name
                          and r["level"] == lv and r["defense"] == "none"), None)
                cells.append("–" if r is None else f"{_pct(r.get('delta_pct'))} ({100 * r['accuracy']:.0f}%)")
            lines.append("| " + " | ".join([name, f"{lv:g}", *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def _model_styles(rows: list[dict], models: list[str], plt: Any) -> dict[str, dict]:
    """Colours that stay readable for 24 models: one colour family per (arch, prior), darker for larger β;
    dashed lines for MSHP. For a handful of models, plain tab10 colours."""
    if len(models) <= 6:
        cmap = plt.get_cmap("tab10")
        return {m: {"color": cmap(i % 10), "ls": "-"} for i, m in enumerate(models)}
    info = {r["model"]: (r.get("arch", ""), r.get("prior", ""), r.get("beta")) for r in rows}
    groups = sorted({info[m][:2] for m in models})
    maps = ["Blues", "Oranges", "Greens", "Purples", "Reds", "Greys", "YlOrBr", "BuGn", "RdPu"]
    out = {}
    for m in models:
        arch, prior, beta = info[m]
        peers = sorted({info[p][2] or 0.0 for p in models if info[p][:2] == (arch, prior)})
        rank = peers.index(beta or 0.0) / max(len(peers) - 1, 1)
        cmap = plt.get_cmap(maps[groups.index((arch, prior)) % len(maps)])
        out[m] = {"color": cmap(0.45 + 0.5 * rank), "ls": "--" if prior == "mshp" else "-"}
    return out


def write_plots(rows: list[dict], folder: Path) -> dict[str, Path]:
    """PNG plots: bytes vs ε per attack, per-corruption Δ% heatmap, defense trade-off (bytes vs accuracy), and for
    campaigns over β, bytes vs β per family and prior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    models = list(dict.fromkeys(r["model"] for r in rows))
    clean = {r["model"]: r for r in rows if r["condition"] == "clean" and r["defense"] == "none"}
    attacks = list(dict.fromkeys(r["name"] for r in rows if r["condition"] == "attack"))
    many = len(models) > 6
    cmap = plt.get_cmap("tab10")
    styles = _model_styles(rows, models, plt)

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(folder / name, buf.getvalue())
        files[name.removesuffix(".png")] = folder / name

    if attacks:
        fig, axes = plt.subplots(2, len(attacks), figsize=(4.2 * len(attacks), 7), squeeze=False, sharey="row")
        for j, a in enumerate(attacks):
            for m in models:
                pts = sorted((r["level"], r["bytes_mean"], r.get("delta_pct", 0.0)) for r in rows
                             if r["model"] == m and r["condition"] == "attack" and r["name"] == a
                             and r["defense"] == "none")
                if not pts or m not in clean:
                    continue
                xs = [0.0] + [p[0] for p in pts]
                kw = {**styles[m], "marker": "o", "ms": 3, "lw": 1.2, "label": m}
                axes[0, j].plot(xs, [clean[m]["bytes_mean"]] + [p[1] for p in pts], **kw)
                axes[1, j].plot(xs, [0.0] + [p[2] for p in pts], **kw)
            axes[0, j].set_title(a)
            axes[0, j].set_ylabel("real bytes / image")
            axes[1, j].set_ylabel("Δ% vs clean")
            axes[1, j].set_xlabel("ε (/255)")
            axes[1, j].axhline(0, color="grey", lw=0.6)
        if many:
            fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                       fontsize=7, title="model (colour: family+prior, shade: β)", title_fontsize=7)
        else:
            axes[0, 0].legend(fontsize=8)
        fig.suptitle("Real coded bytes vs attack budget ε")
        save(fig, "bytes_vs_eps.png")

    corr = list(dict.fromkeys((r["name"], r["level"]) for r in rows if r["condition"] == "corruption"))
    if corr:
        mat = np.full((len(models), len(corr)), np.nan)
        for i, m in enumerate(models):
            for j, (n, lv) in enumerate(corr):
                r = next((r for r in rows if r["model"] == m and r["condition"] == "corruption" and r["name"] == n
                          and r["level"] == lv and r["defense"] == "none"), None)
                if r is not None and r.get("delta_pct") is not None:
                    mat[i, j] = r["delta_pct"]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(corr) + 3), max(2.5, 0.35 * len(models) + 1.5)))
        lim = max(10.0, float(np.nanmax(np.abs(mat)))) if np.isfinite(mat).any() else 10.0
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(corr)), [f"{n}\n{lv:g}" for n, lv in corr], rotation=60, fontsize=7, ha="right")
        ax.set_yticks(range(len(models)), models, fontsize=7)
        for i in range(len(models)):
            for j in range(len(corr)):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:+.0f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, label="Δ% real bytes vs clean")
        ax.set_title("Corruptions: change in real coded bytes (severity below the name)")
        save(fig, "corruptions_delta.png")

    # accuracy attacks sit near 0% and would squash the axis; their cells stay in the tables
    defended = [r for r in rows if r["defense"] != "none" and r["name"] != "accuracy_pgd"]
    if defended:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        undef = {(r["model"], r["condition"], r["name"], r["level"]): r for r in rows if r["defense"] == "none"}
        markers = {"clean": "o", "attack": "^", "corruption": "s"}
        for i, m in enumerate(models):
            color = styles[m]["color"]
            for r in defended:
                if r["model"] != m:
                    continue
                u = undef.get((m, r["condition"], r["name"], r["level"]))
                if u is None:
                    continue
                ax.annotate("", xy=(r["bytes_mean"], 100 * r["accuracy"]),
                            xytext=(u["bytes_mean"], 100 * u["accuracy"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8, "alpha": 0.7})
                ax.scatter([u["bytes_mean"]], [100 * u["accuracy"]], color=color, marker=markers[r["condition"]],
                           s=18, alpha=0.5)
                ax.scatter([r["bytes_mean"]], [100 * r["accuracy"]], color=color, marker=markers[r["condition"]],
                           s=30, edgecolor="black", linewidth=0.5)
                if len(models) <= 2:
                    ax.annotate(r["label"].split("+")[0], (r["bytes_mean"], 100 * r["accuracy"]), fontsize=6,
                                xytext=(3, -8 if i % 2 else 4), textcoords="offset points", color=color)
            if m in clean:
                ax.scatter([clean[m]["bytes_mean"]], [100 * clean[m]["accuracy"]], color=color, marker="*", s=80,
                           label=m)
        ax.set_xlabel("real bytes / image")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("Defense trade-off: arrows from undefended to defended input (★ clean; accuracy attack omitted)",
                     fontsize=9)
        if many:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        else:
            ax.legend(fontsize=8)
        save(fig, "defense_tradeoff.png")

    betas = [r for r in rows if r["condition"] == "clean" and r["defense"] == "none" and r.get("beta") is not None]
    groups = sorted({(r["arch"], r["prior"]) for r in betas})
    if len({r["beta"] for r in betas}) > 1 and attacks:
        main_attack = "entropy_pgd" if "entropy_pgd" in attacks else attacks[0]
        levels = sorted({r["level"] for r in rows if r["condition"] == "attack" and r["name"] == main_attack})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for gi, (arch, prior) in enumerate(groups):
            ms = sorted((r for r in betas if r["arch"] == arch and r["prior"] == prior), key=lambda r: r["beta"])
            color = cmap(gi % cmap.N)
            axes[0].plot([r["beta"] for r in ms], [r["bytes_mean"] for r in ms], "o-", color=color,
                         label=f"{arch}/{prior} clean")
            for k, lv in enumerate(levels):
                pts = [(r["beta"], a["bytes_mean"], a.get("delta_pct")) for r in ms for a in rows
                       if a["model"] == r["model"] and a["condition"] == "attack" and a["name"] == main_attack
                       and a["level"] == lv and a["defense"] == "none"]
                style = ["--", ":", "-."][k % 3]
                axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, lw=1)
                axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", ms=3, color=color,
                             label=f"{arch}/{prior} ε={lv:g}")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("β (rate weight)")
        axes[0].set_ylabel("real bytes / image (solid: clean, dashed: attacked)")
        axes[1].set_ylabel(f"Δ% real bytes under {main_attack}")
        axes[0].legend(fontsize=6)
        axes[1].legend(fontsize=5, ncol=2)
        fig.suptitle("Rate–distortion factor β vs real bytes and the entropy attack's effect")
        save(fig, "bytes_vs_beta.png")
    return files


# ================================================================================================== headline
def write_headline(rows: list[dict], cfg: CampaignConfig, out: Path) -> dict[str, Path]:
    """The issue's headline measurements for one model, each checked against its target."""
    h = cfg.headline or {}
    model = h.get("model") or rows[0]["model"]
    rs = [r for r in rows if r["model"] == model]

    def find(cond: str, name: str, level: float, defense: str = "none") -> dict | None:
        return next((r for r in rs if r["condition"] == cond and r["name"] == name and r["level"] == level
                     and r["defense"] == defense), None)

    attack, eps = h.get("attack", "entropy_pgd"), float(h.get("eps", 8))
    defense, deps = h.get("defense", "object_tv"), float(h.get("defend_eps", 4))
    min_delta, max_drop = float(h.get("min_attack_delta_pct", 30)), float(h.get("max_accuracy_drop_pt", 2))
    clean = find("clean", "clean", 0)
    if clean is None:
        raise RuntimeError(f"headline: no clean cell for model {model!r}")
    ent = find("attack", attack, eps)
    checks: list[dict] = []

    def check(what: str, value: Any, target: str, ok: bool | None) -> None:
        checks.append({"measurement": what, "value": value, "target": target, "met": ok})

    if ent:
        check(f"{attack} ε={eps:g}/255: Δ% real bytes", round(ent["delta_pct"], 2), f"≥ +{min_delta:g}%",
              ent["delta_pct"] >= min_delta)
    for b in h.get("baselines", ["accuracy_pgd", "sign_noise"]):
        r = find("attack", b, eps)
        if r and ent:
            check(f"{b} ε={eps:g}/255: Δ% real bytes", round(r["delta_pct"], 2),
                  f"< {attack}'s {ent['delta_pct']:+.1f}%", r["delta_pct"] < ent["delta_pct"])
    att = find("attack", attack, deps)
    dfd = find("attack", attack, deps, defense)
    if dfd:
        check(f"{defense} on {attack} ε={deps:g}/255: real bytes vs clean mean",
              f"{dfd['bytes_mean']:.1f} B vs {clean['bytes_mean']:.1f} B ({dfd['delta_pct']:+.1f}%)",
              "≤ clean mean", dfd["bytes_mean"] <= clean["bytes_mean"])
        check(f"{defense} on {attack} ε={deps:g}/255: top-1 vs clean",
              f"{100 * dfd['accuracy']:.2f}% vs {100 * clean['accuracy']:.2f}% ({dfd['accuracy_delta_pt']:+.2f} pt)",
              f"within {max_drop:g} pt of clean", dfd["accuracy_delta_pt"] >= -max_drop)
    cdf = find("clean", "clean", 0, defense)
    adaptive, aeps = h.get("adaptive", "adaptive_pgd"), float(h.get("adaptive_eps", deps))
    ad_raw, ad_def = find("attack", adaptive, aeps), find("attack", adaptive, aeps, defense)
    if ad_def:
        check(f"{adaptive} (BPDA through {defense}) ε={aeps:g}/255, defended: Δ% real bytes vs clean",
              round(ad_def["delta_pct"], 2), "report", None)
    result = {
        "model": model, "images": clean["images"], "data": cfg.data, "git_commit": git_commit(),
        "clean": _brief(clean), "attack": _brief(ent), "attack_defended_eps": _brief(att),
        "defended": _brief(dfd), "clean_defended": _brief(cdf),
        "baselines": {b: _brief(find("attack", b, eps)) for b in h.get("baselines", ["accuracy_pgd", "sign_noise"])},
        "adaptive": {"undefended": _brief(ad_raw), "defended": _brief(ad_def)},
        "checks": checks,
    }
    atomic_write_json(out / "headline.json", result)
    lines = [f"# Headline measurements: `{model}`, {clean['images']} test images", "",
             f"Real coded bytes per image (ANS stream length) and top-1 from the decoded latent. Data "
             f"`{cfg.data}`.", "",
             "| condition | real B/image | KB | Δ% vs clean | top-1 | Δ top-1 |", "|---|---|---|---|---|---|"]
    for label, r in [("clean", clean), (f"clean + {defense}", cdf), (f"{attack} ε={eps:g}", ent),
                     *[(f"{b} ε={eps:g}", find("attack", b, eps)) for b in h.get("baselines", [])],
                     (f"{attack} ε={deps:g}", att), (f"{attack} ε={deps:g} + {defense}", dfd),
                     (f"{adaptive} ε={aeps:g} (vs {defense}), undefended", ad_raw),
                     (f"{adaptive} ε={aeps:g} (vs {defense}) + {defense}", ad_def)]:
        if r is None:
            continue
        lines.append(f"| {label} | {r['bytes_mean']:.1f} | {r['kb_mean']:.3f} | {_pct(r.get('delta_pct'))} | "
                     f"{100 * r['accuracy']:.2f}% | {_pt(r.get('accuracy_delta_pt'))} |")
    lines += ["", "| check | value | target | met |", "|---|---|---|---|"]
    for c in checks:
        met = "report" if c["met"] is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['measurement']} | {c['value']} | {c['target']} | {met} |")
    atomic_write_text(out / "headline.md", "\n".join(lines) + "\n")
    return {"headline_json": out / "headline.json", "headline_md": out / "headline.md"}


def _brief(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {k: r.get(k) for k in ("label", "bytes_mean", "kb_mean", "bytes_p95", "delta_pct", "accuracy",
                                  "accuracy_delta_pt", "steps", "eot", "attack_params", "defense_params",
                                  "input_seconds")}


# ======================================================================================================== main
def run_from_args(config: str | None, preset: str | None, out: str | None, resume: bool, progress: bool = True,
                  images: int | None = None) -> tuple[Campaign, list[dict]]:
    if bool(config) == bool(preset):
        raise ValueError("give exactly one of --config FILE or --preset NAME")
    cfg = load_config(config) if config else load_config(preset_path(preset))  # type: ignore[arg-type]
    if images is not None:
        cfg.images = _positive_int(images, "--images")
    out_dir = Path(out) if out else Path("campaign-output") / cfg.name
    camp = Campaign(cfg, out_dir, resume=resume, progress=progress)
    return camp, camp.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m resilience.campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        camp, rows = run_from_args(args.config, args.preset, args.out, args.resume, not args.no_progress, args.images)
    except ValueError as exc:
        print(f"campaign: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(camp.out), "cells": len(rows), **camp.stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
