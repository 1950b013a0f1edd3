"""``splitinfer demo`` end to end on a small image count (what ``make demo`` runs, with 20 images per condition),
from the sample images shipped in the package (the path a fresh machine without ../shared takes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "splitinfer.cli", "demo", "--out", str(out), "--images", "20", "--no-progress",
           "--data", str(ROOT / "splitinfer" / "sample_images")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "Bytes per image on the wire" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    tags = summary["tags"]
    assert list(tags) == ["clean", "attack:entropy_pgd:4", "attack:entropy_pgd:8", "defended:object_tv",
                          "corruption:shot_noise:3", "corruption:defocus_blur:3"]
    for tag, e in tags.items():
        assert e["images"] == 20 and e["errors"] == 0, tag
        assert e["payload"]["mean"] < e["message"]["mean"] < e["tcp"]["mean"], tag
    clean = tags["clean"]
    for eps in (4, 8):
        att = tags[f"attack:entropy_pgd:{eps}"]
        assert att["payload"]["mean"] > clean["payload"]["mean"] and att["tcp"]["mean"] > clean["tcp"]["mean"]
    assert tags["attack:entropy_pgd:8"]["payload"]["mean"] > tags["attack:entropy_pgd:4"]["payload"]["mean"]
    assert tags["attack:entropy_pgd:8"]["payload"]["mean"] > tags["defended:object_tv"]["payload"]["mean"]
    html = (out / "report.html").read_text()
    for fig in ("plot-bytes-by-tag", "plot-distribution", "plot-over-time"):
        assert f"id='{fig}'><svg" in html.replace("\n", "")
    # a second run reuses the cached attacks (nothing recomputed) and still succeeds
    cache = sorted(p.name for p in (out / "cache").glob("*.npz"))
    mtimes = {p: p.stat().st_mtime for p in (out / "cache").glob("*.npz")}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "inputs computed" not in again.stdout
    assert sorted(p.name for p in (out / "cache").glob("*.npz")) == cache
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())
