"""``splitinfer attack``, ``splitinfer corrupt`` and ``splitinfer campaign``: the resilience toolkit's commands.

Kept out of ``splitinfer.cli`` so that the toolkit can grow without touching the core command; ``cli.build_parser``
calls :func:`add_commands`. Like the other subcommands, heavy imports (torch, imagecorruptions, matplotlib) happen
inside the handlers, so ``splitinfer --help`` stays fast.

Both ``attack`` and ``corrupt`` write their images as lossless PNG in the input's ImageFolder layout (same relative
paths, ``.png``) so ``splitinfer eval --data OUT`` reads them back, with a JSON manifest beside them. They resume:
finished images are skipped on a rerun, every file is written atomically (temp file + ``os.replace``), and a rerun
with other settings into the same folder is refused instead of mixing two experiments.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ATTACK_MANIFEST = "attack.json"
CORRUPT_MANIFEST = "corrupt.json"
# manifest fields that must match for a rerun to resume an existing output folder
_ATTACK_IDENTITY = ("fingerprint", "attack", "eps", "steps", "eot", "alpha", "random_start", "seed", "batch",
                    "defense", "params", "source", "limit")
_CORRUPT_IDENTITY = ("source", "limit", "seed", "size")


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _parse_params(items: list[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key.strip()] = _yaml_value(value)
    return out


def _check_manifest(path: Path, fresh: dict, identity: tuple[str, ...], what: str) -> dict | None:
    """The existing manifest when its settings match (resume), None when there is none; else a ValueError."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc}); remove it or choose another --out") from None
    changed = [k for k in identity if old.get(k) != fresh.get(k)]
    if changed:
        raise ValueError(f"{path.parent} holds {what} made with other settings ({', '.join(changed)} differ); use "
                         "another --out or delete that folder")
    return old


def _cmd_attack(args: argparse.Namespace) -> int:

    from models.evaluate import load_split_model
    from resilience.campaign import atomic_write_json, attack_kwargs, iter_attack, load_images, save_png

    if args.eps <= 0:
        raise ValueError(f"--eps must be positive (in units of 1/255), got {args.eps:g}")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    params = _parse_params(args.param, "--param")
    defense_params = _parse_params(args.defense_param, "--defense-param")
    kw = attack_kwargs(args.attack, args.steps, args.eot, args.alpha, args.random_start, args.defense,
                       defense_params or None, params)
    model, man = load_split_model(args.checkpoint)
    data = load_images(args.data, model.spec.input_size, args.limit)
    out = Path(args.out)
    targets = [out / Path(rel).with_suffix(".png") for rel in data.paths]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{args.data}: two source images map to the same PNG name (e.g. x.jpg and x.png)")
    manifest = {
        "tool": "splitinfer attack", "checkpoint": args.checkpoint, "fingerprint": man["fingerprint"],
        "arch": man.get("arch"), "prior": man.get("prior"), "size": model.spec.input_size,  # inputs resized to it
        "attack": args.attack, "eps": args.eps,
        "eps_units": "1/255", "steps": kw.get("steps"), "eot": kw.get("eot_iter"), "alpha": args.alpha,
        "random_start": bool(args.random_start), "seed": args.seed, "batch": args.batch,
        "defense": kw.get("defense"), "defense_params": kw.get("defense_kw"), "params": params,
        "source": str(Path(args.data).resolve()), "limit": args.limit, "count": 0, "total": len(targets),
        "finished": False, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": "PNG, lossless, uint8, inside the L-inf eps ball (rounded); same relative paths as the source; "
                "batch [i, i+batch) is seeded with seed + i",
    }
    mpath = out / ATTACK_MANIFEST
    old = _check_manifest(mpath, manifest, _ATTACK_IDENTITY, "attacked images")
    if old is not None:
        manifest["started"] = old.get("started", manifest["started"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(mpath, manifest)
    done_before = sum(t.exists() for t in targets)

    def skip(start: int, stop: int) -> bool:
        return all(t.exists() for t in targets[start:stop])

    written = 0
    t0 = time.time()
    for start, adv in iter_attack(model, data.images, data.labels, args.attack, args.eps, kw, args.seed, args.batch,
                                  skip, progress=not args.json, desc=f"{args.attack} {args.eps:g}/255"):
        for j, image in enumerate(adv):
            t = targets[start + j]
            if not t.exists():  # a batch cut short by an interruption: keep what is there, add the rest
                save_png(t, image)
                written += 1
        manifest["count"] = sum(t.exists() for t in targets)
        atomic_write_json(mpath, manifest)
    count = sum(t.exists() for t in targets)
    manifest.update(count=count, finished=count == len(targets), finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    atomic_write_json(mpath, manifest)
    summary = {"out": str(out), "attack": args.attack, "eps": args.eps, "written": written,
               "skipped": done_before, "count": count, "seconds": round(time.time() - t0, 1)}
    if args.json:
        print(json.dumps(summary))
    else:
        from splitinfer.cli import _print_table

        _print_table([(k, str(v)) for k, v in summary.items()], ("field", "value"))
    return 0


def _cmd_corrupt(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from resilience.campaign import (
        atomic_write_json,
        corrupt_image,
        corruption_seed,
        load_images,
        parse_corruptions,
        parse_severities,
        save_png,
    )

    names = parse_corruptions(args.corruption)
    severities = parse_severities(args.severity)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    data = load_images(args.data, args.size, args.limit)
    out = Path(args.out)
    manifest = {"tool": "splitinfer corrupt", "source": str(Path(args.data).resolve()), "limit": args.limit,
                "seed": args.seed, "size": args.size, "corruptions": names, "severities": severities,
                "count": 0, "total": len(data) * len(names) * len(severities), "finished": False,
                "layout": "OUT/<corruption>/<severity>/<class>/<file>.png",
                "note": "imagecorruptions (imagecorruptions-imaug); each image seeded from (seed, corruption, "
                        "severity, relative path)", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    mpath = out / CORRUPT_MANIFEST
    old = _check_manifest(mpath, manifest, _CORRUPT_IDENTITY, "corrupted images")
    if old is not None:  # a rerun may add corruptions/severities; the manifest lists everything present
        manifest["corruptions"] = list(dict.fromkeys([*old.get("corruptions", []), *names]))
        manifest["severities"] = sorted(set(old.get("severities", [])) | set(severities))
        manifest["started"] = old.get("started", manifest["started"])
        manifest["total"] = len(data) * len(manifest["corruptions"]) * len(manifest["severities"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(mpath, manifest)
    rels = [Path(rel).with_suffix(".png") for rel in data.paths]
    written = skipped = 0
    t0 = time.time()
    bar = tqdm(total=len(data) * len(names) * len(severities), unit="img", disable=args.json, dynamic_ncols=True,
               mininterval=1.0)
    for name in names:
        for sev in severities:
            bar.set_description(f"{name} {sev}")
            for image, rel, key in zip(data.images, rels, data.paths, strict=True):
                target = out / name / str(sev) / rel
                if target.exists():
                    skipped += 1
                else:
                    save_png(target, corrupt_image(image, name, sev, corruption_seed(args.seed, name, sev, key)))
                    written += 1
                bar.update(1)
            manifest["count"] = _count_corrupt(out, manifest, rels)
            atomic_write_json(mpath, manifest)
    bar.close()
    manifest["count"] = _count_corrupt(out, manifest, rels)
    manifest.update(finished=manifest["count"] == manifest["total"], finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    atomic_write_json(mpath, manifest)
    summary = {"out": str(out), "corruptions": len(names), "severities": severities, "images": len(data),
               "written": written, "skipped": skipped, "seconds": round(time.time() - t0, 1)}
    if args.json:
        print(json.dumps(summary))
    else:
        from splitinfer.cli import _print_table

        _print_table([(k, str(v)) for k, v in summary.items()], ("field", "value"))
    return 0


def _count_corrupt(out: Path, manifest: dict, rels: list[Path]) -> int:
    return sum((out / n / str(s) / r).exists() for n in manifest["corruptions"] for s in manifest["severities"]
               for r in rels)


def _cmd_campaign(args: argparse.Namespace) -> int:
    from resilience.campaign import run_from_args

    camp, rows = run_from_args(args.config, args.preset, args.out, args.resume, not args.json, args.images)
    summary = {"out": str(camp.out), "cells": len(rows), **camp.stats}
    if args.json:
        print(json.dumps(summary))
        return 0
    from splitinfer.cli import _print_table

    show = [r for r in rows if r["condition"] != "corruption" or r["defense"] == "none"]
    _print_table([(r["model"], r["label"], f"{r['bytes_mean']:.1f}", f"{r.get('delta_pct', 0.0):+.1f}%",
                   f"{100 * r['accuracy']:.1f}%") for r in show[:60]],
                 ("model", "cell", "real B/image", "Δ% vs clean", "top-1"))
    if len(show) > 60:
        print(f"... {len(show) - 60} more rows in {camp.out / 'results.csv'}")
    print(f"{summary['cells']} cells ({summary['computed']} computed, {summary['cached']} from cache); results, "
          f"tables.md and plots in {camp.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the ``attack``, ``corrupt`` and ``campaign`` subcommands to splitinfer's subparsers."""
    a = sub.add_parser(
        "attack", help="attack images (entropy PGD and baselines) and save them as PNG in ImageFolder layout",
        description="Run an attack from resilience.attacks on an ImageFolder tree and write the attacked images "
        "losslessly as PNG under --out with the same relative paths (so 'splitinfer eval --data OUT' reads them), "
        "plus OUT/attack.json. Resumable: rerun the same command after an interruption and finished images are "
        "skipped.",
        epilog="Attacks: entropy_pgd (rate of the coded latent, L-inf), entropy_pgd_l2, accuracy_pgd (cross-entropy "
        "through the split model), sign_noise (random +-eps), lowfreq_pgd (low DCT frequencies; --param keep=8), "
        "region_pgd (rate weighted to the image centre), adaptive_pgd (BPDA through --defense).")
    a.add_argument("--checkpoint", required=True, help="bundled name (default-fp, default-mshp) or path")
    a.add_argument("--data", required=True, help="ImageFolder tree of source images")
    a.add_argument("--attack", required=True, help="attack name (see below)")
    a.add_argument("--eps", type=float, required=True, help="budget in units of 1/255 (--eps 8 = 8/255)")
    a.add_argument("--out", required=True, help="output folder (ImageFolder layout + attack.json)")
    a.add_argument("--steps", type=int, default=None, help="PGD steps (default 20)")
    a.add_argument("--eot", type=int, default=None, help="expectation over N quantization-noise draws (default: "
                   "16 for the entropy attacks, 1 for accuracy_pgd)")
    a.add_argument("--alpha", type=float, default=None, help="step size in 1/255 (default: eps/4 for L-inf)")
    a.add_argument("--random-start", action="store_true", help="start from a random point in the eps-ball")
    a.add_argument("--defense", default=None, help="adaptive_pgd only: the defense to attack through (default "
                   "object_tv)")
    a.add_argument("--defense-param", action="append", metavar="KEY=VALUE", help="adaptive_pgd: defense parameter")
    a.add_argument("--param", action="append", metavar="KEY=VALUE", help="extra attack parameter, e.g. keep=8 "
                   "(lowfreq_pgd)")
    a.add_argument("--limit", type=int, default=None, help="attack N images spread over the classes")
    a.add_argument("--batch", type=int, default=50, help="images per attack batch (default 50)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                   "often faster on a shared 2-core machine)")
    a.add_argument("--json", action="store_true", help="print one JSON object (and no progress bar)")
    a.set_defaults(func=_cmd_attack)

    c = sub.add_parser(
        "corrupt", help="apply ImageNet-C corruptions (15 + 4 extras) at severities 1-5, as PNG trees",
        description="Corrupt an ImageFolder tree with imagecorruptions and write OUT/<corruption>/<severity>/"
        "<class>/<file>.png plus OUT/corrupt.json. Resumable: existing images are skipped.")
    c.add_argument("--data", required=True, help="ImageFolder tree of source images")
    c.add_argument("--corruption", required=True, help="a corruption name, comma-separated names, or 'all' (the "
                   "15 ImageNet-C corruptions and speckle_noise, gaussian_blur, spatter, saturate)")
    c.add_argument("--severity", required=True, help="1-5, comma-separated severities, or 'all'")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--limit", type=int, default=None, help="corrupt N images spread over the classes")
    c.add_argument("--size", type=int, default=32, help="images are resized to SIZE x SIZE first (default 32, "
                   "the CIFAR models' input)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="print one JSON object (and no progress bar)")
    c.set_defaults(func=_cmd_corrupt_args)

    g = sub.add_parser(
        "campaign", help="run a grid of models x attacks x eps x corruptions x defenses, in real bytes",
        description="Measure real coded bytes and top-1 accuracy for every cell of a grid given by a YAML config "
        "(or a preset): clean, attacked, corrupted and defended inputs per model; optionally train the models "
        "first. Writes results.csv/json, tables.md, plots/*.png (and headline.md/json for a headline block). "
        "Each finished cell is cached; --resume continues an interrupted or extended campaign.",
        epilog="Presets: small (bundled FP + MSHP, 200 images, ~10 min), full (3 families x 2 priors x 4 beta, "
        "short-trained here, ~75 min), headline (default-mshp, 1000 images: the issue's headline figures).")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", default=None, help="campaign YAML file (see resilience/presets/*.yaml)")
    src.add_argument("--preset", default=None, help="small, full or headline")
    g.add_argument("--out", default=None, help="output folder (default campaign-output/<name>)")
    g.add_argument("--resume", action="store_true", help="continue a campaign in --out: finished cells and "
                   "trained models are reused")
    g.add_argument("--images", type=int, default=None, help="override the config's number of test images")
    g.add_argument("--json", action="store_true", help="print one JSON summary (and no progress bars)")
    g.set_defaults(func=_cmd_campaign)


def _cmd_corrupt_args(args: argparse.Namespace) -> int:
    """--corruption/--severity accept comma-separated lists."""
    if args.corruption != "all" and "," in args.corruption:
        args.corruption = [s.strip() for s in args.corruption.split(",") if s.strip()]
    if args.severity != "all":
        args.severity = [s.strip() for s in str(args.severity).split(",") if s.strip()]
    return _cmd_corrupt(args)
