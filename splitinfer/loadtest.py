"""``splitinfer loadtest``: prepare replayable streams per tag, run the load generator, report and plot.

With no model or data flags the streams come from the bundled default model and the package's sample test images:
clean, entropy-attacked (computed once and cached), defended on the edge, corrupted — any tag
``splitinfer.inputs`` understands. ``attack`` and ``defended`` alone in ``--mix`` mean ``attack:entropy_pgd:8``
and ``defended:object_tv``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from edge_client.client import build_request

ALIASES = {"attack": "attack:entropy_pgd:8", "defended": "defended:object_tv"}


def cache_root() -> Path:
    return Path(os.environ.get("SPLITINFER_CACHE", Path.home() / ".cache" / "splitinfer")) / "loadtest"


def expand_mix(mix: dict[str, float]) -> dict[str, float]:
    return {ALIASES.get(t, t): s for t, s in mix.items()}


def prepare_streams(tags: list[str], checkpoint: str = "default-mshp", data: str | None = None, images: int = 200,
                    cache: Path | None = None) -> tuple[dict[str, list[bytes]], dict]:
    """Serialized requests (no request/client id) per tag, and the bundle info they were coded with."""
    from edge_client.defense import EdgeDefense
    from edge_client.runtime import EdgeEncoder
    from models.data import load_image_folder
    from models.export import export_bundle
    from splitinfer.demo import default_data
    from splitinfer.inputs import InputCache

    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    ds = load_image_folder(data or default_data(), limit=images, per_class=True)
    inputs = InputCache(cache, checkpoint, ds.images, ds.labels)
    bundle = cache / f"bundle-{inputs.fingerprint[:16]}"
    if not (bundle / "bundle.json").exists():
        tmp = cache / f"bundle-{inputs.fingerprint[:16]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_bundle(checkpoint, tmp)
        os.replace(tmp, bundle)
    encoder = EdgeEncoder(bundle)
    streams: dict[str, list[bytes]] = {}
    for tag in tags:
        x, cond = inputs.images_for(tag)
        if cond.kind == "defended":
            x = EdgeDefense(encoder, cond.name)(x)
        streams[tag] = [build_request(encoder.bundle.info, enc, tag=tag, label=int(label)).SerializeToString()
                        for enc, label in zip(encoder.encode(x), ds.labels, strict=True)]
    return streams, encoder.bundle.info


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    by_tag: dict[str, list] = {}
    for tag, sent, lat, status in result["timeline"]:
        by_tag.setdefault(tag, []).append((sent, lat, status))
    for tag, rows in sorted(by_tag.items()):
        ok = np.sort([lat for _, lat, st in rows if st == "OK"])
        if len(ok):
            a1.plot(ok, np.arange(1, len(ok) + 1) / len(ok), label=tag)
        t = np.array([s for s, _, _ in rows])
        bins = np.arange(0, result["config"]["duration_s"] + 1.0, 1.0)
        a2.plot(bins[:-1], np.histogram(t, bins)[0], label=tag, drawstyle="steps-post")
    a1.set_xscale("log")
    a1.set_xlabel("latency of answered requests (ms)")
    a1.set_ylabel("fraction")
    a1.set_title("Latency CDF by tag")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xlabel("seconds")
    a2.set_ylabel("requests sent per second")
    a2.set_title("Offered load over time")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "loadtest.json", "plot": out / "loadtest.png"}
    tmp = files["json"].with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, files["json"])
    plot(result, files["plot"])
    return files


def table_rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for tag, f in [*result["tags"].items(), ("overall", result["overall"])]:
        lat = f["latency_ms"] or {}
        rows.append((tag, str(f["clients"]), str(f["sent"]), str(f["ok"]),
                     ", ".join(f"{k}:{v}" for k, v in f["errors"].items()) or "0",
                     f"{f['requests_per_s']:.1f}", *(f"{lat[p]:.1f}" if lat else "–" for p in ("p50", "p95", "p99")),
                     f"{f['message_bytes_per_s'] / 1000:.1f}",
                     f"{f['tcp_bytes_per_s'] / 1000:.1f}" if f["tcp_bytes_per_s"] is not None else "–"))
    return rows


TABLE_HEADER = ("tag", "clients", "sent", "ok", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "msg kB/s",
                "TCP kB/s")
