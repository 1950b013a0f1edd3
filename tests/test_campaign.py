"""The resilience toolkit's commands and campaign engine: ``splitinfer attack``, ``corrupt`` and ``campaign``.

Pinned here: attacked images land as lossless PNG in the input's ImageFolder layout with a manifest, stay inside
their integer ε-ball, are read back by ``splitinfer eval``, and a rerun resumes (skips finished images, recomputes a
missing one identically, refuses other settings); all 19 corruptions run at all 5 severities; a tiny campaign writes
CSV/JSON/markdown/plots with real-byte rows and a rerun recomputes nothing; config errors name the bad field.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from resilience import campaign as C
from splitinfer.resilience_cli import add_commands

from .conftest import make_image_tree


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitinfer")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    return p


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    return json.loads(capsys.readouterr().out)


def _pngs(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


def test_commands_have_help_and_reject_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    parser = _parser()
    for cmd in ("attack", "corrupt", "campaign"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: splitinfer {cmd}" in capsys.readouterr().out
    tree = make_image_tree(tmp_path / "src", classes=1, per_class=1)
    bad = [
        (["attack", "--checkpoint", "default-fp", "--data", str(tree), "--attack", "nope", "--eps", "8", "--out",
          str(tmp_path / "a")], "unknown attack 'nope'"),
        (["attack", "--checkpoint", "default-fp", "--data", str(tree), "--attack", "entropy_pgd", "--eps", "-1",
          "--out", str(tmp_path / "a")], "--eps must be positive"),
        (["attack", "--checkpoint", "default-fp", "--data", str(tree), "--attack", "entropy_pgd", "--eps", "8",
          "--defense", "tv", "--out", str(tmp_path / "a")], "only taken by the adaptive attack"),
        (["corrupt", "--data", str(tree), "--corruption", "fog,nope", "--severity", "3", "--out",
          str(tmp_path / "c")], "unknown corruption(s) 'nope'"),
        (["corrupt", "--data", str(tree), "--corruption", "fog", "--severity", "6", "--out", str(tmp_path / "c")],
         "severity '6'"),
        (["campaign", "--preset", "nope"], "unknown preset 'nope'"),
    ]
    for argv, message in bad:
        args = parser.parse_args(argv)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            args.func(args)


def test_attack_writes_png_tree_with_manifest_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from splitinfer.cli import main

    src = make_image_tree(tmp_path / "src", classes=3, per_class=3)
    out = tmp_path / "attacked"
    argv = ["attack", "--checkpoint", "default-fp", "--data", str(src), "--attack", "entropy_pgd", "--eps", "8",
            "--out", str(out), "--steps", "2", "--eot", "1", "--batch", "4", "--json"]
    first = _run(argv, capsys)
    assert (first["written"], first["skipped"], first["count"]) == (9, 0, 9)
    images = _pngs(out)
    assert sorted(images) == sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))  # same layout
    sources = _pngs(src)
    moved = 0
    for rel, adv in images.items():
        d = adv.astype(int) - sources[rel].astype(int)
        assert adv.dtype == np.uint8 and adv.shape == (32, 32, 3)
        assert np.abs(d).max() <= 8  # inside the integer eps-ball
        moved += int(np.abs(d).max() > 0)
    assert moved == 9
    man = json.loads((out / "attack.json").read_text())
    for key, value in {"checkpoint": "default-fp", "attack": "entropy_pgd", "eps": 8.0, "steps": 2, "eot": 1,
                       "seed": 0, "count": 9, "finished": True}.items():
        assert man[key] == value, key
    assert len(man["fingerprint"]) == 64 and man["source"] == str(src.resolve())

    again = _run(argv, capsys)  # resume: nothing to do
    assert (again["written"], again["skipped"]) == (0, 9)
    victim = out / "class1" / "0001.png"  # an interrupted run: one image missing -> only it is redone, identically
    victim.unlink()
    redo = _run(argv, capsys)
    assert (redo["written"], redo["skipped"]) == (1, 8)
    assert np.array_equal(_pngs(out)[str(victim.relative_to(out))], images[str(victim.relative_to(out))])
    args = _parser().parse_args([*argv[:-1], "--seed", "1"])
    with pytest.raises(ValueError, match="other settings .*seed"):
        args.func(args)

    assert main(["eval", "--checkpoint", "default-fp", "--data", str(out), "--json"]) == 0  # eval reads the tree
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 9 and res["bytes_real_mean"] > 0


def test_corrupt_runs_all_19_corruptions_at_all_5_severities(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    src = make_image_tree(tmp_path / "src", classes=2, per_class=1)
    out = tmp_path / "corrupted"
    argv = ["corrupt", "--data", str(src), "--corruption", "all", "--severity", "all", "--out", str(out), "--json"]
    res = _run(argv, capsys)
    names = C.corruption_names()
    assert len(names) == 19 and res["written"] == 19 * 5 * 2
    sources = _pngs(src)
    changed = 0
    for name in names:
        for sev in range(1, 6):
            for rel, im in sources.items():
                img = np.asarray(Image.open(out / name / str(sev) / rel))
                assert img.shape == im.shape and img.dtype == np.uint8
                changed += int(not np.array_equal(img, im))
    assert changed >= 0.9 * 190  # every corruption does something at (almost) every severity
    man = json.loads((out / "corrupt.json").read_text())
    assert man["finished"] and man["count"] == 190 and man["severities"] == [1, 2, 3, 4, 5]
    assert _run(argv, capsys)["written"] == 0  # resume
    # the same pixels from the campaign's in-memory path (per-image seeds, order independent)
    key = sorted(sources)[1]
    again = C.corrupt_images(sources[key][None], [key.replace(".png", ".png")], "shot_noise", 3, 0)[0]
    assert np.array_equal(again, np.asarray(Image.open(out / "shot_noise" / "3" / key)))


def _tiny_config(data: Path) -> dict:
    return {"name": "tiny", "data": str(data), "images": 8, "batch": 4, "models": ["default-fp"],
            "attacks": [{"name": "entropy_pgd", "eps": [8], "steps": 2, "eot": 1}],
            "corruptions": [{"name": "shot_noise", "severity": 3}],
            "defenses": [{"name": "object_tv", "params": {"iters": 20}}]}


def test_campaign_writes_outputs_and_a_rerun_recomputes_nothing(tmp_path: Path) -> None:
    data = make_image_tree(tmp_path / "src", classes=4, per_class=2)
    cfg = C.parse_config(_tiny_config(data))
    out = tmp_path / "camp"
    camp = C.Campaign(cfg, out, progress=False, log=lambda _m: None)
    rows = camp.run()
    labels = {r["label"] for r in rows}
    assert labels == {"clean", "clean+object_tv", "entropy_pgd@8", "entropy_pgd@8+object_tv", "shot_noise@3"}
    assert camp.stats["computed"] == 5 and camp.stats["cached"] == 0
    by = {r["label"]: r for r in rows}
    assert all(r["images"] == 8 and r["bytes_mean"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert by["entropy_pgd@8"]["delta_pct"] == pytest.approx(
        100 * (by["entropy_pgd@8"]["bytes_mean"] / by["clean"]["bytes_mean"] - 1))
    assert by["entropy_pgd@8"]["bytes_mean"] > by["clean"]["bytes_mean"]
    for f in ("results.csv", "results.json", "tables.md", "campaign.json", ".gitignore", "plots/bytes_vs_eps.png",
              "plots/corruptions_delta.png", "plots/defense_tradeoff.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 5
    assert "| 8 |" in (out / "tables.md").read_text()
    assert json.loads((out / "campaign.json").read_text())["finished"]

    with pytest.raises(ValueError, match="--resume"):
        C.Campaign(cfg, out, progress=False).run()
    cell_files = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    again = C.Campaign(cfg, out, resume=True, progress=False, log=lambda _m: None)
    rows2 = again.run()
    assert again.stats["computed"] == 0 and again.stats["cached"] == 5 and again.computed_cells == []
    assert again.stats["inputs_computed"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == cell_files
    assert [r["bytes_mean"] for r in rows2] == [r["bytes_mean"] for r in rows]

    # extending the grid computes only the new cells (the other budgets' keys do not change)
    raw = _tiny_config(data)
    raw["attacks"].append({"name": "sign_noise", "eps": [8]})
    more = C.Campaign(C.parse_config(raw), out, resume=True, progress=False, log=lambda _m: None)
    more.run()
    assert sorted(more.computed_cells) == ["default-fp/sign_noise@8", "default-fp/sign_noise@8+object_tv"]


def test_campaign_cli_with_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_image_tree(tmp_path / "src", classes=2, per_class=2)
    raw = _tiny_config(data) | {"images": 4, "attacks": [{"name": "sign_noise", "eps": [4]}], "corruptions": [],
                                "defenses": []}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = _run(["campaign", "--config", str(path), "--out", str(tmp_path / "o"), "--json"], capsys)
    assert res["cells"] == 2 and res["computed"] == 2
    res = _run(["campaign", "--config", str(path), "--out", str(tmp_path / "o"), "--resume", "--json"], capsys)
    assert res["computed"] == 0 and res["cached"] == 2


def test_campaign_trains_its_models_resumably(tmp_path: Path) -> None:
    """A train: block (family x priors x beta from an FP base model) on a class-balanced subset; a rerun trains
    nothing and recomputes nothing."""
    train = make_image_tree(tmp_path / "train", classes=4, per_class=40)
    data = make_image_tree(tmp_path / "test", classes=4, per_class=1, seed=1)
    raw = {"data": str(data), "images": 4, "threads": 1,
           "train": {"data": str(train), "families": ["resnet_shallow"], "priors": ["fp", "mshp"], "betas": [0.5],
                     "epochs": 1, "limit": 128, "batch_size": 64, "base": {"epochs": 1, "limit": 128}}}
    out = tmp_path / "camp"
    logs: list[str] = []
    camp = C.Campaign(C.parse_config(raw), out, progress=False, log=logs.append)
    rows = camp.run()
    assert {(r["model"], r["prior"], r["beta"]) for r in rows} == {("resnet_shallow-fp-b0.5", "fp", 0.5),
                                                                   ("resnet_shallow-mshp-b0.5", "mshp", 0.5)}
    assert sum(m.startswith("trained ") for m in logs) == 3  # the FP base, then both priors
    subset = out / "models" / "data" / "train-128-per-class"
    assert sorted(len(list(d.iterdir())) for d in subset.iterdir()) == [32, 32, 32, 32]  # balanced, not class 0
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.pt")}
    assert len(ckpts) == 3
    logs.clear()
    again = C.Campaign(C.parse_config(raw), out, resume=True, progress=False, log=logs.append)
    again.run()
    assert not any(m.startswith("training") for m in logs) and again.stats["computed"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "models").glob("*.pt")} == ckpts


@pytest.mark.parametrize("patch,message", [
    ({"modles": ["default-fp"]}, "config: unknown key(s) 'modles'"),
    ({"attacks": [{"name": "entropy_pgd", "eps": [8], "stpes": 3}]}, "attacks[0]: unknown key(s) 'stpes'"),
    ({"attacks": [{"name": "entropy", "eps": [8]}]}, "attacks[0].name: 'entropy' is not an attack"),
    ({"attacks": [{"name": "entropy_pgd"}]}, "attacks[0].eps: required"),
    ({"attacks": [{"name": "entropy_pgd", "eps": [-2]}]}, "attacks[0].eps: expected a positive number"),
    ({"attacks": [{"name": "sign_noise", "eps": [8], "params": {"keep": 4}}]}, "takes no parameter 'keep'"),
    ({"corruptions": [{"name": "fgo", "severity": 3}]}, "corruptions[0]: unknown corruption(s) 'fgo'"),
    ({"corruptions": [{"name": "fog", "severity": 0}]}, "corruptions[0]: severity 0"),
    ({"defenses": [{"name": "object-tv"}]}, "defenses[0].name: 'object-tv' is not a defense"),
    ({"defenses": [{"name": "tv", "apply_to": ["everything"]}]}, "defenses[0].apply_to"),
    ({"defenses": [{"name": "tv", True: ["clean"]}]}, "defenses[0]: unknown key(s) 'True'"),
    ({"defenses": [{"name": "object_tv", "params": {"wieght": 1}}]},
     "defenses[0].params: defense 'object_tv' takes no parameter(s) 'wieght'"),
    ({"images": 0}, "images: expected a positive integer"),
    ({"models": []}, "models: give at least one model"),
    ({"train": {"families": ["resnet"], "betas": [0.1], "epohcs": 1}}, "train: unknown key(s) 'epohcs'"),
    ({"train": {"families": ["vgg"], "betas": [0.1]}}, "train.families: 'vgg'"),
    ({"train": {"families": ["regnet"], "betas": [0.1]}}, "train.base: required"),
])
def test_bad_config_gives_clear_errors(tmp_path: Path, patch: dict, message: str) -> None:
    raw = {"data": str(tmp_path), "models": ["default-fp"], "attacks": [], **patch}
    with pytest.raises(C.ConfigError) as exc:
        C.parse_config(raw)
    assert message in str(exc.value)


def test_presets_parse_and_unknown_models_are_named(tmp_path: Path) -> None:
    for name in ("small", "full", "headline"):
        cfg = C.load_config(C.preset_path(name))
        assert cfg.attacks and cfg.defenses
    full = C.load_config(C.preset_path("full"))
    assert full.train is not None and len(full.train.families) * len(full.train.priors) * len(full.train.betas) == 24
    cfg = C.parse_config({"data": str(tmp_path), "models": ["no-such-model"]})
    with pytest.raises(ValueError, match="no-such-model"):
        C.Campaign(cfg, tmp_path / "o", progress=False).run()


def test_to_uint8_stays_in_the_integer_ball() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    adv = images / 255.0 + rng.uniform(-0.05, 0.05, images.shape)
    out = C.to_uint8(adv, images, 4)
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - images).max() <= 4
    assert np.abs(C.to_uint8(adv, images, 2.5).astype(int) - images).max() <= 2
