"""Clean clients' latency on a bandwidth-limited link: (a) alone, (b) beside entropy-attacked clients, (c) with the
server's protection and/or the edge defense.

Each case builds a fresh emulated link (two network namespaces, veth, tbf; needs root), starts
``splitinfer serve`` in the server namespace and ``splitinfer loadtest`` in the client namespace, and reads the
load generator's JSON. Writes report.md, results.json and a plot to --out.

    sudo .venv/bin/python benchmarks/link_experiment.py --out results/link-experiment
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitinfer.netlink import SERVER_IP, EmulatedLink, available  # noqa: E402

SPLITINFER = str(ROOT / ".venv" / "bin" / "splitinfer")
PORT = 50051


def cases(args: argparse.Namespace) -> list[dict]:
    nc, na, r = args.clean_clients, args.attacked_clients, args.rate_per_client
    both = {"clients": nc + na, "rate": (nc + na) * r}
    mix_att = f"clean={nc},attack:entropy_pgd:{args.eps}={na}"
    protect = ["--anomaly-policy", "reject", "--anomaly-backoff-ms", str(args.backoff_ms), "--budget-bytes-per-s",
               str(args.budget)]
    return [
        {"case": "a", "what": f"{nc} clean clients alone", "clients": nc, "rate": nc * r, "mix": "clean=1",
         "server": []},
        {"case": "b", "what": f"+ {na} entropy-attacked clients (ε={args.eps}/255), no protection", **both,
         "mix": mix_att, "server": []},
        {"case": "b0", "what": f"for reference: {nc + na} clean clients (as many clients as (b), no attack)",
         **both, "mix": "clean=1", "server": []},
        {"case": "c1", "what": "as (b), server protection: anomaly policy reject + per-client byte budget", **both,
         "mix": mix_att, "server": protect},
        {"case": "c2", "what": "as (b), the attacked clients run the edge defense (object-aware TV)", **both,
         "mix": f"clean={nc},defended:object_tv={na}", "server": []},
    ]


def run_case(case: dict, args: argparse.Namespace, out: Path) -> dict:
    server = [SPLITINFER, "serve", "--insecure", "--host", SERVER_IP, "--port", str(PORT), "--checkpoint",
              args.checkpoint, *case["server"]]
    load = [SPLITINFER, "loadtest", "--insecure", "--server", f"{SERVER_IP}:{PORT}", "--clients",
            str(case["clients"]), "--mix", case["mix"], "--rate", str(case["rate"]), "--duration",
            str(args.duration), "--timeout", str(args.timeout), "--checkpoint", args.checkpoint, "--json",
            "--out", str(out / f"case-{case['case']}"), "--seed", str(args.seed), "--warmup", str(args.warmup)]
    with EmulatedLink(rate_kbit=args.rate_kbit) as link:
        log = open(out / f"server-{case['case']}.log", "w")  # noqa: SIM115 - closed below
        link.popen("server", server, stdout=log, stderr=subprocess.STDOUT)
        link.wait_port(PORT, timeout=120)
        proc = link.run("client", load, timeout=args.duration + 300, capture_output=True, text=True)
        log.close()
    if proc.returncode:
        raise RuntimeError(f"case {case['case']}: loadtest failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/link-experiment")
    p.add_argument("--rate-kbit", type=float, default=240.0, help="link rate each way")
    p.add_argument("--clean-clients", type=int, default=2)
    p.add_argument("--attacked-clients", type=int, default=4)
    p.add_argument("--rate-per-client", type=float, default=10.0, help="requests per second per client")
    p.add_argument("--eps", type=int, default=8)
    p.add_argument("--budget", type=float, default=6000.0, help="per-client byte budget (B/s) in case c1")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds left out of the latency percentiles")
    p.add_argument("--backoff-ms", type=int, default=5000, help="back-off advised to anomalous clients in c1")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--checkpoint", default="default-mshp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated case names to run")
    args = p.parse_args()
    ok, why = available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # streams (attacks included) are computed once, outside the timed runs
    from splitinfer.loadtest import prepare_streams

    prepare_streams(["clean", f"attack:entropy_pgd:{args.eps}", "defended:object_tv"], args.checkpoint)
    previous = out / "results.json"
    results = json.loads(previous.read_text())["cases"] if args.only and previous.exists() else {}
    for case in cases(args):
        if args.only and case["case"] not in args.only.split(","):
            continue
        t0 = time.time()
        res = run_case(case, args, out)
        results[case["case"]] = {"what": case["what"], "server_flags": case["server"], "mix": case["mix"],
                                 "clients": case["clients"], "rate": case["rate"], "tags": res["tags"]}
        clean = res["tags"]["clean"]
        print(f"case {case['case']}: clean p50/p95/p99 {clean['latency_ms']['p50']:.0f}/"
              f"{clean['latency_ms']['p95']:.0f}/{clean['latency_ms']['p99']:.0f} ms, ok {clean['ok']}/"
              f"{clean['sent']}, errors {clean['errors']} ({time.time() - t0:.0f} s)", flush=True)
    results = {name: results[name] for name in [c["case"] for c in cases(args)] if name in results}
    doc = {"args": vars(args), "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                        text=True).stdout.strip(), "cases": results}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "results.json")
    write_report(doc, out)
    return 0


def write_report(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases_ = doc["cases"]
    base = cases_.get("a", {}).get("tags", {}).get("clean", {}).get("latency_ms", {}).get("p99")
    a = doc["args"]
    lines = ["# Clean clients' latency on a bandwidth-limited link", "",
             f"Link: {a['rate_kbit']:g} kbit/s each way (tbf in network namespaces); model {a['checkpoint']}; "
             f"{a['rate_per_client']:g} requests/s per client (Poisson), {a['duration']:g} s per case, "
             f"deadline {a['timeout']:g} s; the first {a['warmup']:g} s of each case are left out of the latency "
             f"percentiles (connection set-up, first batches; their requests still count); commit "
             f"{doc['commit'][:12]}.", "",
             "Command: `.venv/bin/python benchmarks/link_experiment.py "
             + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items() if v is not None and k != "only")
             + "` (as root).", "",
             "| case | setting | clean p50 ms | clean p95 ms | clean p99 ms | p99 / (a) | clean ok/sent | clean errors "
             "| other tags: ok/sent, errors, msg B, TCP kB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, c in cases_.items():
        clean = c["tags"]["clean"]
        lat = clean["latency_ms"]
        others = "; ".join(f"{t}: {f['ok']}/{f['sent']}, {f['errors'] or 0}, {f['message_bytes_mean']:.0f} B, "
                           f"{(f['tcp_bytes_per_s'] or 0) / 1000:.1f}" for t, f in c["tags"].items() if t != "clean")
        ratio = f"{lat['p99'] / base:.2f}" if base else "–"
        lines.append(f"| {name} | {c['what']} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} | {ratio} | "
                     f"{clean['ok']}/{clean['sent']} | {clean['errors'] or 0} | {others or '–'} |")
    lines += ["", "Target: (b) clearly above (a); (c) ≤ 1.25 × (a).", "",
              "Reading: (b0) has as many clients as (b), all clean, so (b) against (b0) is the share of the harm "
              "that the attack's inflation adds on top of the added load. (c1) refuses the attacked clients' "
              "streams (their running mean size is far above the model's clean sizes) and tells them to back off, "
              "so the link carries little more than in (a). (c2) keeps every client sending: the edge defense "
              "shrinks the attacked streams but the load stays near (b0)'s, so on this link a defense alone "
              "cannot meet the bound; it protects the bytes per image, not the link's capacity.", "",
              "![clean p99 by case](p99.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(cases_)
    ax.bar(names, [cases_[n]["tags"]["clean"]["latency_ms"]["p99"] for n in names], color="#4C72B0")
    if base:
        ax.axhline(1.25 * base, color="#C44E52", ls="--", label="1.25 × (a)")
        ax.legend()
    ax.set_ylabel("clean clients' p99 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Clean clients' p99 on the shaped link")
    fig.tight_layout()
    fig.savefig(out / "p99.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
