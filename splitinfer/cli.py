"""``splitinfer``: one console command with a subcommand per job (``splitinfer <subcommand> --help``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_DATA_HINT = "an ImageFolder tree, e.g. ../shared/datasets/cifar10/train"


def _cmd_train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, train_backbone, train_split

    cfg = TrainConfig(arch=args.arch, data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, threads=args.threads, limit=args.limit, val_data=args.val_data,
                      prior=None if args.prior == "none" else args.prior, beta=args.beta, teacher=args.teacher,
                      distill_epochs=args.fit_prior_epochs, adam_lr=args.adam_lr,
                      extra={"init": args.init, "val_limit": args.val_limit})
    manifest = train_backbone(cfg) if cfg.prior is None else train_split(cfg)
    summary = {k: manifest[k] for k in ("kind", "arch", "prior", "beta", "accuracy", "bytes_real_mean",
                                         "bytes_estimated_mean", "fingerprint") if k in manifest}
    print(json.dumps({"checkpoint": args.out, **summary}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from models.data import load_image_folder
    from models.evaluate import evaluate_split, load_split_model

    model, man = load_split_model(args.checkpoint)
    data = load_image_folder(args.data, model.spec.input_size, args.limit, per_class=args.limit is not None)
    res = evaluate_split(model, data, progress=not args.json)
    res = {"checkpoint": args.checkpoint, "arch": man["arch"], "prior": man["prior"], "beta": man["beta"],
           "data": args.data, **res}
    if args.json:
        print(json.dumps(res))
    else:
        _print_table([(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in res.items()], ("metric", "value"))
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from models.checkpoint import bundled_names, read_checkpoint

    rows = []
    for name in bundled_names():
        man = read_checkpoint(name)["manifest"]
        rows.append({"name": name, **{k: man.get(k) for k in ("kind", "arch", "prior", "beta", "accuracy",
                                                              "bytes_real_mean", "fingerprint")}})
    if args.json:
        print(json.dumps(rows))
    else:
        _print_table([(r["name"], r["arch"], r["prior"], str(r["beta"]), f"{r['accuracy']:.4f}",
                       f"{r['bytes_real_mean']:.1f}") for r in rows],
                     ("name", "arch", "prior", "beta", "accuracy", "bytes/image"))
    return 0


def _cmd_models_refresh(args: argparse.Namespace) -> int:
    from models.checkpoint import read_checkpoint
    from models.evaluate import load_with_tables, measure_and_save
    from models.split import SplitModel

    ck = read_checkpoint(args.checkpoint)
    man = ck["manifest"]
    model = SplitModel(man["arch"], man["prior"], len(man["classes"]))
    load_with_tables(model, ck["state_dict"])
    out = args.out or ck["path"]
    man = measure_and_save(model, man, out, args.val_data, args.val_limit)
    print(json.dumps({k: man.get(k) for k in ("fingerprint", "accuracy", "bytes_real_mean", "bytes_estimated_mean",
                                               "jpeg_bytes_mean", "val_images")}, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from models.export import export_bundle

    info = export_bundle(args.checkpoint, args.out)
    print(json.dumps({k: info[k] for k in ("model_id", "fingerprint", "arch", "prior", "latent_shape",
                                           "hyper_shape")} | {"bundle": args.out}, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.service import ServerConfig, serve_forever

    serve_forever(ServerConfig(checkpoint=args.checkpoint, host=args.host, port=args.port, device=args.device,
                               max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                               decode_workers=args.decode_workers, max_message_bytes=args.max_message_bytes,
                               torch_threads=args.threads, monitor=args.monitor, monitor_token=args.monitor_token,
                               tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                               insecure=args.insecure, tokens=args.tokens,
                               budget_bytes_per_s=args.budget_bytes_per_s, budget_burst_bytes=args.budget_burst_bytes,
                               anomaly_policy=args.anomaly_policy, anomaly_backoff_ms=args.anomaly_backoff_ms))
    return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    from monitor.app import serve_monitor

    serve_monitor(args.db, args.host, args.port, args.token)
    return 0


def _cmd_relay(args: argparse.Namespace) -> int:
    import signal
    import threading

    from monitor.relay import CountingRelay
    from monitor.reporter import MonitorReporter

    reporter = MonitorReporter(args.monitor, args.monitor_token) if args.monitor else None
    relay = CountingRelay(_host_port(args.upstream, "--upstream"), _host_port(args.listen, "--listen"),
                          reporter).start()
    print(f"relaying {relay.name} -> {args.upstream}; counting bytes"
          + (f", reporting to {args.monitor}" if args.monitor else ""), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    relay.stop()
    if reporter is not None:
        reporter.close()
    print(json.dumps(relay.totals()), flush=True)
    return 0


def _host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from edge_client.client import Security
    from edge_client.loadgen import LoadConfig, LoadRun, check_servers, parse_mix
    from splitinfer.loadtest import TABLE_HEADER, expand_mix, prepare_streams, table_rows, write_outputs

    if not args.server:
        raise ValueError("--server is required (flag, config file loadtest.server, or SPLITINFER_LOADTEST_SERVER)")
    for flag in ("clients", "rate", "duration", "timeout"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be positive")
    if args.duration > 3600 or args.clients > 10_000:
        raise ValueError("--duration is capped at 3600 s and --clients at 10000 (bounded load tests)")
    mix = expand_mix(parse_mix(args.mix))
    security = Security(insecure=args.insecure, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        token=args.token, server_name=args.server_name)
    security.credentials()
    servers = [s.strip() for s in args.server.split(",") if s.strip()]
    streams, info = prepare_streams(sorted(mix), args.checkpoint, args.data, args.images)
    check_servers(servers, info, security)
    cfg = LoadConfig(servers=servers, clients=args.clients, mix=mix, rate=args.rate, duration=args.duration,
                     timeout=args.timeout, seed=args.seed, security=security, measure_tcp=not args.no_relay,
                     honor_backoff=not args.ignore_backoff, warmup=args.warmup)
    run = LoadRun(cfg, streams)
    if not args.json:
        print(f"load: {len(run.tags)} clients {dict(sorted(cfg.mix.items()))} at {cfg.rate:g} req/s for "
              f"{cfg.duration:g} s against {', '.join(servers)}", flush=True)
    result = run.run()
    result["model_id"] = info["model_id"]
    files = write_outputs(result, Path(args.out)) if args.out else {}
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    else:
        _print_table(table_rows(result), TABLE_HEADER)
        for name, path in files.items():
            print(f"{name}: {path}")
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    from splitinfer.netlink import run_pair

    if args.rate_kbit <= 0:
        raise ValueError("--rate-kbit must be positive")
    return run_pair(args.rate_kbit, args.server_cmd, args.client_cmd, args.port, args.timeout)


def _cmd_demo(args: argparse.Namespace) -> int:
    from splitinfer.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=Path(args.out), checkpoint=args.checkpoint, data=args.data, images=args.images,
                        progress=not args.no_progress))
    return 0


def _cmd_edge(args: argparse.Namespace) -> int:
    """Torch-free: onnxruntime head, numpy codec, gRPC."""
    from edge_client.client import EdgeClient
    from edge_client.runtime import EdgeEncoder
    from splitinfer.images import collect_images, read_image

    for flag in ("bundle", "server", "images"):
        if not getattr(args, flag):
            raise ValueError(f"--{flag} is required (flag, config file edge.{flag}, or SPLITINFER_EDGE_"
                             f"{flag.upper()})")
    security = _edge_security(args)
    encoder = EdgeEncoder(args.bundle)
    defense = None
    if args.defense:
        from edge_client.defense import EdgeDefense

        defense = EdgeDefense(encoder, args.defense)
    files = collect_images(args.images)[: args.limit]
    client = EdgeClient(args.server, encoder.bundle, timeout=args.timeout, client_id=args.client_id,
                        security=security)
    rows = []
    for f in files:
        image = read_image(f, encoder.input_size)[None]
        t0 = time.perf_counter()
        enc = encoder.encode(defense(image) if defense is not None else image)[0]
        edge_ms = (time.perf_counter() - t0) * 1000
        req = client.request(enc, tag=args.tag)
        reply = client.send(req)
        best = reply.top_k[0]
        rows.append({"image": str(f), "class": best.name, "label": best.label, "probability": best.probability,
                     "payload_bytes": len(enc.data), "message_bytes": req.ByteSize(), "edge_ms": edge_ms,
                     "server_ms": reply.server_ms, "rtt_ms": (time.perf_counter() - t0) * 1000 - edge_ms})
    client.close()
    if args.json:
        print(json.dumps({"server": args.server, "model_id": encoder.bundle.info["model_id"],
                          "providers": encoder.providers, "images": rows}))
    else:
        _print_table([(Path(r["image"]).name, r["class"], f"{r['probability']:.3f}", str(r["payload_bytes"]),
                       str(r["message_bytes"]), f"{r['edge_ms']:.1f}", f"{r['server_ms']:.1f}") for r in rows],
                     ("image", "class", "p", "payload B", "message B", "edge ms", "server ms"))
    return 0


def _edge_security(args: argparse.Namespace) -> object:
    from edge_client.client import Security

    sec = Security(insecure=args.insecure, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                   token=args.token, server_name=args.server_name)
    sec.credentials()  # validates files and flag combinations before any work
    return sec


def _cmd_config(args: argparse.Namespace) -> int:
    import os

    import yaml

    from splitinfer.config import effective

    values = effective(_subcommands(build_parser()), args.config or os.environ.get("SPLITINFER_CONFIG"), os.environ)
    if args.section:
        values = {args.section: values[args.section]}
    print(yaml.safe_dump(values, sort_keys=True), end="")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from splitinfer.certs import make_certs

    files = make_certs(args.out, [h for h in args.hosts.split(",") if h], [c for c in args.clients.split(",") if c],
                       args.days)
    print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
    return 0


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*header)
    for r in rows:
        table.add_row(*r)
    Console().print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitinfer", description="Entropy-coded split inference: train, evaluate, "
                                "serve and attack split DNNs, measured in real bytes.")
    sub = p.add_subparsers(dest="command", metavar="<subcommand>", required=True)

    t = sub.add_parser("train", help="train a backbone (--prior none) or a split model (--prior fp|mshp)",
                       description="Train a teacher backbone or a split model; resumable: rerun the same command "
                       "after an interruption.")
    t.add_argument("--arch", required=True, help="family: resnet, resnet_shallow, regnet (CIFAR scale) or "
                   "resnet50, resnet101, regnety_6_4gf (paper scale)")
    t.add_argument("--prior", choices=["fp", "mshp", "none"], required=True, help="entropy model; none = backbone")
    t.add_argument("--beta", type=float, default=None, help="rate weight: loss = CE + beta * bits-per-pixel")
    t.add_argument("--data", required=True, help=DEFAULT_DATA_HINT)
    t.add_argument("--out", required=True, help="checkpoint path to write (manifest beside it as .json)")
    t.add_argument("--epochs", type=int, default=10, help="end-to-end epochs (default 10)")
    t.add_argument("--fit-prior-epochs", type=int, default=0,
                   help="epochs fitting only the entropy model to the frozen encoder first (with --init)")
    t.add_argument("--init", default=None, help="split checkpoint to start encoder/decoder/tail from")
    t.add_argument("--teacher", default=None, help="backbone checkpoint: tail init + KD term")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=0.2, help="peak SGD learning rate of the tail (one-cycle)")
    t.add_argument("--adam-lr", type=float, default=2e-3,
                   help="peak Adam learning rate of encoder/decoder/hyper networks (one-cycle)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    t.add_argument("--val-data", default=None, help="ImageFolder tree measured into the manifest after training")
    t.add_argument("--val-limit", type=int, default=None, help="images of --val-data to measure (default all)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="accuracy and real coded bytes of a split model",
                       description="Code every image on its own, decode it, classify the decoded latent.")
    e.add_argument("--checkpoint", required=True, help="bundled name (default-fp, default-mshp) or path")
    e.add_argument("--data", required=True, help="ImageFolder tree, e.g. ../shared/datasets/cifar10/test")
    e.add_argument("--limit", type=int, default=None, help="evaluate N images spread over the classes")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.set_defaults(func=_cmd_eval)

    m = sub.add_parser("models", help="bundled checkpoints", description="Bundled checkpoints.")
    msub = m.add_subparsers(dest="models_command", metavar="<action>", required=True)
    ml = msub.add_parser("list", help="list bundled checkpoints", description="List bundled checkpoints.")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=_cmd_models_list)
    mr = msub.add_parser("refresh", help="re-measure a checkpoint's manifest (fingerprint, accuracy, bytes)",
                         description="Recompute the codec fingerprint and, with --val-data, accuracy and real bytes "
                         "of a split checkpoint (e.g. after a codec change); rewrites it atomically.")
    mr.add_argument("--checkpoint", required=True)
    mr.add_argument("--val-data", default=None)
    mr.add_argument("--val-limit", type=int, default=None)
    mr.add_argument("--out", default=None, help="write here instead of over the checkpoint")
    mr.set_defaults(func=_cmd_models_refresh)

    x = sub.add_parser("export", help="write an edge bundle (head ONNX + codec tables + manifest)",
                       description="Export what a torch-free edge needs: head.onnx, codec.npz, bundle.json.")
    x.add_argument("--checkpoint", required=True, help="bundled name or path")
    x.add_argument("--out", required=True, help="bundle directory")
    x.set_defaults(func=_cmd_export)

    sv = sub.add_parser("serve", help="run the gRPC server (decode + tail)",
                        description="Serve a split checkpoint over gRPC: validate, decode, batch, run the tail.")
    sv.add_argument("--checkpoint", default="default-mshp", help="bundled name or path (default default-mshp)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    sv.add_argument("--port", type=int, default=50051)
    sv.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sv.add_argument("--max-batch", type=int, default=32)
    sv.add_argument("--max-delay-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    sv.add_argument("--decode-workers", type=int, default=2)
    sv.add_argument("--max-message-bytes", type=int, default=1 << 20)
    sv.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sv.add_argument("--monitor", default=None, help="monitor base URL (e.g. http://127.0.0.1:8000): report every "
                    "request's payload and message bytes there")
    sv.add_argument("--monitor-token", default=None, help="bearer token the monitor requires for ingest")
    sv.add_argument("--tls-cert", default=None, help="server certificate (PEM); with --tls-key serves TLS")
    sv.add_argument("--tls-key", default=None, help="server private key (PEM)")
    sv.add_argument("--tls-client-ca", default=None, help="CA (PEM) that signs client certificates: mutual TLS, "
                    "clients without a valid certificate are refused")
    sv.add_argument("--tokens", default=None, help="YAML/JSON file mapping bearer tokens to client ids; every call "
                    "then needs metadata 'authorization: Bearer <token>' and the token's client id is used")
    sv.add_argument("--insecure", action="store_true", help="serve plaintext (refused unless given explicitly)")
    sv.add_argument("--budget-bytes-per-s", type=float, default=None, help="per-client byte budget (token bucket "
                    "on received message bytes); over it: RESOURCE_EXHAUSTED with retry-after-ms (default: none)")
    sv.add_argument("--budget-burst-bytes", type=int, default=None,
                    help="token bucket size (default: 2 s of budget, at least --max-message-bytes)")
    sv.add_argument("--anomaly-policy", default="off", choices=["off", "flag", "deprioritize", "reject"],
                    help="streams above the clean size distribution (p99.5 of the model's own clean streams + 10%%): "
                    "flag them, decode them last, or refuse them with PERMISSION_DENIED (default off)")
    sv.add_argument("--anomaly-backoff-ms", type=int, default=1000,
                    help="retry-after advised to a client whose request was refused as anomalous (default 1000)")
    _config_flag(sv)
    sv.set_defaults(func=_cmd_serve)

    mo = sub.add_parser("monitor", help="run the monitor: byte records in SQLite, /metrics, /api/*, dashboard",
                        description="Run the monitor service (FastAPI on uvicorn). Servers and relays post records "
                        "to it; it serves /api/summary, /api/records, /metrics, /healthz and a dashboard at /.")
    mo.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    mo.add_argument("--port", type=int, default=8000)
    mo.add_argument("--db", default="splitinfer-monitor.sqlite3", help="SQLite database path (created if missing)")
    mo.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on POST /api/ingest")
    _config_flag(mo)
    mo.set_defaults(func=_cmd_monitor)

    rl = sub.add_parser("relay", help="counting TCP relay between edges and a server (bytes on the wire)",
                        description="Forward TCP connections to a server and count the bytes of each connection in "
                        "both directions; report them to the monitor, which joins them to the requests they carried.")
    rl.add_argument("--listen", default="127.0.0.1:50052", help="HOST:PORT edges connect to (default 127.0.0.1:50052)")
    rl.add_argument("--upstream", default="127.0.0.1:50051", help="HOST:PORT of the server (default 127.0.0.1:50051)")
    rl.add_argument("--monitor", default=None, help="monitor base URL to report connections to")
    rl.add_argument("--monitor-token", default=None, help="bearer token the monitor requires for ingest")
    _config_flag(rl)
    rl.set_defaults(func=_cmd_relay)

    from splitinfer.resilience_cli import add_commands as add_resilience_commands

    add_resilience_commands(sub)  # attack, corrupt, campaign

    lt = sub.add_parser("loadtest", help="virtual edge clients replaying clean/attacked/defended streams",
                        description="Drive servers with virtual edge clients (asyncio) that replay pre-encoded "
                        "streams: Poisson arrivals, bounded in time, round-robin over the servers, honouring the "
                        "server's back-off advice. Reports per tag: requests/s, latency p50/p95/p99, message and TCP "
                        "bytes/s, errors by status code; writes JSON and a plot with --out.")
    lt.add_argument("--server", default=None, help="HOST:PORT[,HOST:PORT...]; required")
    lt.add_argument("--clients", type=int, default=4, help="virtual edge clients (default 4)")
    lt.add_argument("--mix", default="clean=0.5,attack=0.5", help="tag shares over the clients, e.g. "
                    "clean=0.5,attack=0.5 (attack = attack:entropy_pgd:8, defended = defended:object_tv; any tag "
                    "such as corruption:shot_noise:3 works)")
    lt.add_argument("--rate", type=float, default=20.0, help="requests per second, all clients together")
    lt.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10, at most 3600)")
    lt.add_argument("--timeout", type=float, default=5.0, help="per-request deadline in seconds")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--warmup", type=float, default=0.0, help="seconds at the start left out of the latency "
                    "percentiles (their requests are still sent and counted)")
    lt.add_argument("--checkpoint", default="default-mshp", help="model the streams are coded with")
    lt.add_argument("--data", default=None, help="ImageFolder tree of source images (default: shared CIFAR-10 test "
                    "when present, else the package's sample images)")
    lt.add_argument("--images", type=int, default=200, help="distinct images per tag (default 200)")
    lt.add_argument("--no-relay", action="store_true", help="dial servers directly (no TCP byte counts)")
    lt.add_argument("--ignore-backoff", action="store_true", help="keep sending when told to back off")
    lt.add_argument("--tls-ca", default=None)
    lt.add_argument("--tls-cert", default=None)
    lt.add_argument("--tls-key", default=None)
    lt.add_argument("--server-name", default=None)
    lt.add_argument("--token", default=None, help="bearer token of the load clients")
    lt.add_argument("--insecure", action="store_true", help="plaintext (refused unless given explicitly)")
    lt.add_argument("--json", action="store_true", help="print one JSON object")
    lt.add_argument("--out", default=None, help="folder for loadtest.json and loadtest.png")
    _config_flag(lt)
    lt.set_defaults(func=_cmd_loadtest)

    ln = sub.add_parser("link", help="run a server and a client on either side of a bandwidth-limited link",
                        description="Build two network namespaces joined by a veth pair shaped with tbf (root "
                        "needed), start --server-cmd in one (reachable at 10.231.0.1), wait for --port, run "
                        "--client-cmd in the other, tear everything down; exit with the client's status.")
    ln.add_argument("--rate-kbit", type=float, required=True, help="link rate, each direction")
    ln.add_argument("--server-cmd", required=True, help="e.g. 'splitinfer serve --insecure --host 10.231.0.1'")
    ln.add_argument("--client-cmd", required=True, help="e.g. 'splitinfer loadtest --insecure --server "
                    "10.231.0.1:50051 --duration 30'")
    ln.add_argument("--port", type=int, default=50051, help="server port to wait for")
    ln.add_argument("--timeout", type=float, default=3600, help="longest client run in seconds")
    ln.set_defaults(func=_cmd_link)

    dm = sub.add_parser("demo", help="one-command demo: server, monitor and relay on loopback; clean, attacked, "
                        "defended and corrupted images; table + HTML report",
                        description="Start monitor, server and a counting relay on loopback with a bundled "
                        "checkpoint, stream test images clean, entropy-attacked at two eps, defended and under two "
                        "corruptions, print the per-condition table and write an HTML report. Attacks are computed "
                        "once and cached in the output folder.")
    dm.add_argument("--out", default="demo-output", help="output folder: report.html, summary.json, cache")
    dm.add_argument("--checkpoint", default="default-mshp", help="bundled name or path (default default-mshp)")
    dm.add_argument("--data", default=None, help="ImageFolder tree (default: ../shared/datasets/cifar10/test when "
                    "present, else the sample images shipped with the package)")
    dm.add_argument("--images", type=int, default=200, help="images per condition (default 200)")
    dm.add_argument("--no-progress", action="store_true", help="no progress bars")
    dm.set_defaults(func=_cmd_demo)

    ed = sub.add_parser("edge", help="run the edge client (no torch): head, encode, send",
                        description="Run the head with onnxruntime, entropy-code, send to a server, print results.")
    ed.add_argument("--bundle", default=None, help="edge bundle directory (splitinfer export); required")
    ed.add_argument("--server", default=None, help="HOST:PORT, or several comma-separated (round-robin), or "
                    "dns:///NAME:PORT; required")
    ed.add_argument("--images", default=None, nargs="+", help="image files and/or directories; required")
    ed.add_argument("--limit", type=int, default=None, help="send at most N images")
    ed.add_argument("--tag", default="clean", help="experiment tag sent with each request")
    ed.add_argument("--client-id", default="", help="client id sent with each request")
    ed.add_argument("--timeout", type=float, default=10.0, help="per-request deadline in seconds")
    ed.add_argument("--json", action="store_true")
    ed.add_argument("--tls-ca", default=None, help="CA (PEM) to verify the server with (default: system roots)")
    ed.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    ed.add_argument("--tls-key", default=None, help="client private key (PEM) for mutual TLS")
    ed.add_argument("--server-name", default=None, help="TLS name to verify when the certificate's name differs "
                    "from the dialled address")
    ed.add_argument("--token", default=None, help="bearer token identifying this edge to the server")
    ed.add_argument("--insecure", action="store_true", help="plaintext (refused unless given explicitly)")
    ed.add_argument("--defense", default=None, help="input defense run on the edge before encoding "
                    "(object_tv, tv, bit_depth, median, jpeg)")
    _config_flag(ed)
    ed.set_defaults(func=_cmd_edge)

    cf = sub.add_parser("config", help="print the effective configuration (defaults < file < environment)",
                        description="Print every setting of every section as YAML: built-in defaults, overridden "
                        "by --config FILE (or SPLITINFER_CONFIG), overridden by SPLITINFER_<SECTION>_<KEY>.")
    cf.add_argument("--config", default=None, help="YAML file with sections server, edge, monitor, relay, loadtest")
    cf.add_argument("--section", default=None, choices=["server", "edge", "monitor", "relay", "loadtest"])
    cf.set_defaults(func=_cmd_config)

    ce = sub.add_parser("certs", help="make a private CA and server/client certificates for (mutual) TLS",
                        description="Write ca.pem, server.pem/.key (for --hosts) and one .pem/.key per client; for "
                        "tests and small deployments.")
    ce.add_argument("--out", required=True, help="directory to write into")
    ce.add_argument("--hosts", default="localhost,127.0.0.1", help="comma-separated DNS names / IPs of the server")
    ce.add_argument("--clients", default="edge", help="comma-separated client certificate names")
    ce.add_argument("--days", type=int, default=365)
    ce.set_defaults(func=_cmd_certs)
    return p


def _config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (section per component; flags and "
                   "SPLITINFER_<SECTION>_<KEY> environment variables override it); see splitinfer config")


def main(argv: list[str] | None = None) -> int:
    import os

    from splitinfer.config import ConfigError, apply

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        apply(_subcommands(parser), argv, os.environ)
    except ConfigError as exc:
        print(f"splitinfer: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"splitinfer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. the server serves another model than the bundle
        print(f"splitinfer {args.command}: error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
