"""Soak run: a server under steady mixed load for a long time; memory and latency drift per interval.

Starts ``splitinfer serve`` as a subprocess on loopback (so its RSS is its own), drives it with the load generator
in intervals (clean + entropy-attacked clients, fresh request ids every time, so the idempotency cache fills to
its cap), and prints/writes per interval: server RSS, threads, requests, p50/p99 latency, errors.

    .venv/bin/python benchmarks/soak.py --minutes 10 --out results/soak
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _proc_stat(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval", type=float, default=30.0, help="seconds per reported interval")
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--checkpoint", default="default-mshp")
    p.add_argument("--out", default="results/soak")
    args = p.parse_args()

    from edge_client.loadgen import LoadConfig, LoadRun, check_servers
    from splitinfer.loadtest import prepare_streams

    mix = {"clean": 0.5, "attack:entropy_pgd:8": 0.5}
    streams, info = prepare_streams(sorted(mix), args.checkpoint)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "splitinfer"), "serve", "--insecure", "--port", str(port),
                               "--checkpoint", args.checkpoint], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    rows = []
    try:
        check_servers([f"127.0.0.1:{port}"], info)
        end = time.monotonic() + args.minutes * 60
        i = 0
        while time.monotonic() < end:
            cfg = LoadConfig(servers=[f"127.0.0.1:{port}"], clients=args.clients, mix=mix, rate=args.rate,
                             duration=min(args.interval, max(1.0, end - time.monotonic())), seed=i,
                             measure_tcp=False)
            res = LoadRun(cfg, streams).run()["overall"]
            rss, threads = _proc_stat(server.pid)
            row = {"interval": i, "t_s": round(args.interval * (i + 1)), "rss_mb": round(rss, 1), "threads": threads,
                   "sent": res["sent"], "ok": res["ok"], "errors": res["errors"],
                   "p50_ms": round(res["latency_ms"]["p50"], 1), "p99_ms": round(res["latency_ms"]["p99"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            i += 1
    finally:
        server.terminate()
        server.wait(30)
    first, last = rows[0], rows[-1]
    summary = {"minutes": args.minutes, "rate": args.rate, "clients": args.clients, "checkpoint": args.checkpoint,
               "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
               "rss_mb_max": max(r["rss_mb"] for r in rows), "p99_ms_first": first["p99_ms"],
               "p99_ms_last": last["p99_ms"], "requests": sum(r["sent"] for r in rows),
               "errors": sum(sum(r["errors"].values()) for r in rows), "intervals": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "soak.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "soak.json")
    print(json.dumps({k: v for k, v in summary.items() if k != "intervals"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
