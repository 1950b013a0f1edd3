"""Deployment files checked against each other and against the real CLI parser.

Covers ``deploy/Dockerfile.*``, ``docker-compose.yml`` and its overrides, ``deploy/k8s/`` (kustomization, TLS
component, extras), ``deploy/prometheus.yml``, the example config and tokens files, ``.dockerignore`` and the
command lines in ``deploy/README.md``. Pure Python (pyyaml, grpcio; openssl for the TLS test): no docker, kubectl
or network. Every ``splitinfer <subcommand> ...`` command line found anywhere in these files must parse with
``splitinfer.cli.build_parser()``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from splitinfer.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = DEPLOY / "compose.cpu.yml"
TLS_OVERRIDE = DEPLOY / "compose.tls.yml"
DOCKERFILES = {kind: DEPLOY / f"Dockerfile.{kind}" for kind in ("edge", "server", "monitor")}
SERVER_PORT = 50051
MONITOR_PORT = 8000
NAMESPACE = "splitinfer"
SERVER_DEPLOYMENT = "splitinfer-server"
K8S_EXTRAS = {"edge-job.yaml"}  # applied by hand (a Job's spec is immutable), deliberately not in kustomization
try:  # config sections -> subcommands, as splitinfer reads them
    from splitinfer.config import SECTIONS as _SECTIONS

    SECTION_COMMANDS = {section: command for command, section in _SECTIONS.items()}
except ImportError:
    SECTION_COMMANDS = {"server": "serve", "edge": "edge", "monitor": "monitor"}
CONTAINER_USER = "10001"


# ----------------------------------------------------------------------------------------------- loading


class Reset:
    """Compose's ``!reset`` tag: the attribute is removed from the merged model."""


class ComposeLoader(yaml.SafeLoader):
    """yaml.SafeLoader plus Compose's merge tags (``!reset``, ``!override``)."""


def _construct_plain(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", _construct_plain)


def load_compose(path: Path) -> dict:
    doc = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), f"{path}: no services mapping"
    return doc


def k8s_kustomization(directory: Path = K8S) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def k8s_docs(files: list[Path] | None = None) -> list[tuple[Path, dict]]:
    """(file, object) of the kustomization's resources (default) or of the given files."""
    if files is None:
        files = [K8S / r for r in k8s_kustomization()["resources"]]
    out = []
    for f in files:
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return out


def k8s_objects(kind: str, files: list[Path] | None = None) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs(files) if d["kind"] == kind}


@dataclass
class Instruction:
    stage: int
    stage_name: str
    name: str  # FROM, RUN, CMD, ... (upper case)
    args: str
    line: int


def dockerfile(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: continuation lines joined, comments dropped, each tagged with its stage."""
    out: list[Instruction] = []
    stage, stage_name, buf, start = -1, "", "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue  # also inside a continued instruction, as docker does
        if not buf:
            start = no
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        text, buf = buf + s, ""
        name, _, args = text.partition(" ")
        name = name.upper()
        if name == "FROM":
            stage += 1
            m = re.search(r"\bAS\s+(\S+)\s*$", args, re.IGNORECASE)
            stage_name = m.group(1) if m else str(stage)
        out.append(Instruction(stage, stage_name, name, args.strip(), start))
    assert not buf, f"{path}: ends inside a continued line"
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    """Defaults of the ARGs declared in a Dockerfile."""
    out = {}
    for ins in dockerfile(path):
        if ins.name == "ARG":
            key, _, value = ins.args.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def final_stage(path: Path) -> list[Instruction]:
    ins = dockerfile(path)
    last = max(i.stage for i in ins)
    return [i for i in ins if i.stage == last]


def exec_or_shell(args: str) -> list[str]:
    """A CMD/ENTRYPOINT/RUN argument: JSON exec form, else shell form."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
        return value
    return ["/bin/sh", "-c", args]


def healthcheck_command(path: Path) -> list[str]:
    hc = [i for i in final_stage(path) if i.name == "HEALTHCHECK"]
    assert len(hc) == 1, f"{path.name}: expected one HEALTHCHECK in the final stage"
    options, sep, cmd = hc[0].args.partition("CMD ")
    assert sep and "NONE" not in options, f"{path.name}: HEALTHCHECK without CMD"
    return exec_or_shell(cmd.strip())


def healthcheck_code(path: Path) -> str:
    cmd = healthcheck_command(path)
    assert cmd[:2] == ["python", "-c"] and len(cmd) == 3, f"{path.name}: HEALTHCHECK is not `python -c CODE`"
    return cmd[2]


# ------------------------------------------------------------------------------------------ CLI helpers


def subparsers() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("build_parser() has no subcommands")


SUBCOMMANDS = set(subparsers())


def flag_dests(subcommand: str) -> set[str]:
    return {a.dest for a in subparsers()[subcommand]._actions if a.option_strings} - {"help"}


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """``splitinfer ARGV`` through the real parser; a usage error fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`splitinfer {shlex.join(argv)}` does not parse:\n{err.getvalue().strip()}")


def option(argv: list[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), without the parser: port checks must not
    depend on every other flag being known yet."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    assert host and port.isdigit(), f"{target!r} is not HOST:PORT"
    return host, int(port)


def edge_targets(server: str) -> list[tuple[str, int]]:
    """``--server`` value -> (host, port) of each target: ``h:p[,h:p...]`` or ``dns:///h:p``."""
    if server.startswith("dns:"):
        server = server.split("/", 3)[-1] if server.startswith("dns://") else server[4:]
    return [host_port(t) for t in server.split(",")]


SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def shell_invocations(command: str) -> list[list[str]]:
    """``splitinfer <subcommand> ...`` argument lists inside a shell command line."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    tokens = list(lex)
    found, segment = [], []
    for tok in tokens + [";"]:
        if tok in SHELL_OPERATORS:
            for i, t in enumerate(segment[:-1]):
                if t == "splitinfer" and segment[i + 1] in SUBCOMMANDS:
                    found.append(segment[i + 1:])
                    break
            segment = []
        else:
            segment.append(tok)
    return found


def argv_invocations(argv: list[str]) -> list[list[str]]:
    """A container's full command (entrypoint + command) -> its ``splitinfer`` argument lists."""
    if argv[:1] == ["splitinfer"]:
        return [argv[1:]]
    if len(argv) >= 3 and argv[0].rsplit("/", 1)[-1] in ("sh", "bash") and argv[1] in ("-c", "-lc", "-ec"):
        return shell_invocations(argv[2])
    return []


# ------------------------------------------------------------------------------ collecting command lines


@dataclass
class Invocation:
    source: str
    argv: list[str]  # after "splitinfer"
    container: bool  # runs in a container (must bind 0.0.0.0, must choose TLS or --insecure)


def compose_commands() -> Iterator[tuple[str, dict, list[str]]]:
    """(label, service, full argv) of every service command in docker-compose.yml and its overrides."""
    for path in (COMPOSE_FILE, CPU_OVERRIDE, TLS_OVERRIDE):
        for name, svc in load_compose(path)["services"].items():
            entry, cmd = svc.get("entrypoint") or [], svc.get("command") or []
            entry = entry if isinstance(entry, list) else shlex.split(entry)
            cmd = cmd if isinstance(cmd, list) else shlex.split(cmd)
            if entry or cmd:
                yield f"{path.relative_to(ROOT)}:{name}", svc, [str(a) for a in entry + cmd]


def k8s_containers(files: list[Path] | None = None) -> Iterator[tuple[str, dict, dict]]:
    """(label, object, container) of every workload container."""
    for f, obj in k8s_docs(files):
        pod = obj.get("spec", {}).get("template", {}).get("spec") if isinstance(obj.get("spec"), dict) else None
        for c in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            yield f"{f.relative_to(ROOT)}:{obj['metadata']['name']}/{c['name']}", obj, c


def all_k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def readme_commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line, command) of every line in fenced code blocks (continuations joined) and every inline code span
    that holds a command with flags."""
    text = path.read_text()
    in_block, buf, start = False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not buf:
                start = no
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            yield start, buf + line
            buf = ""
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if "--" in span:
                    yield no, span


def collect_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for label, _, argv in compose_commands():
        found += [Invocation(label, a, True) for a in argv_invocations(argv)]
    base = {(d["metadata"]["name"], c["name"]): c for d in k8s_objects("Deployment").values()
            for c in d["spec"]["template"]["spec"]["containers"]}
    for label, obj, c in k8s_containers(all_k8s_files()):
        # a patch (tls component) that replaces only `args` keeps the base container's `command`
        command = c.get("command") or base.get((obj["metadata"]["name"], c["name"]), {}).get("command") or []
        argv = [str(a) for a in command + (c.get("args") or [])]
        found += [Invocation(label, a, True) for a in argv_invocations(argv)]
    for kind, path in DOCKERFILES.items():
        final = max(i.stage for i in dockerfile(path))
        for ins in dockerfile(path):
            if ins.name in ("CMD", "ENTRYPOINT") or (ins.name == "HEALTHCHECK" and "CMD " in ins.args):
                argv = exec_or_shell(ins.args.partition("CMD ")[2].strip() if ins.name == "HEALTHCHECK"
                                     else ins.args)
                found += [Invocation(f"Dockerfile.{kind}:{ins.line}", a, ins.stage == final)
                          for a in argv_invocations(argv)]
            elif ins.name == "RUN":
                found += [Invocation(f"Dockerfile.{kind}:{ins.line}", a, False) for a in shell_invocations(ins.args)]
    for no, cmd in readme_commands(DEPLOY / "README.md"):
        found += [Invocation(f"deploy/README.md:{no}", a, False) for a in shell_invocations(cmd)]
    return found


INVOCATIONS = collect_invocations()


# ----------------------------------------------------------------------------------------------- tests: CLI


def test_invocations_found() -> None:
    """The collector sees the command lines this deployment is made of (guards against checking nothing)."""
    by_source: dict[str, set[str]] = {}
    for inv in INVOCATIONS:
        by_source.setdefault(inv.source.split(":")[0], set()).add(inv.argv[0])
    assert {"serve", "monitor", "edge", "relay"} <= by_source.get("docker-compose.yml", set())
    assert {"serve", "edge"} <= by_source.get("deploy/compose.tls.yml", set())
    assert by_source.get("Dockerfile.edge") == {"export", "edge"}
    assert by_source.get("Dockerfile.server") == {"serve"}
    assert by_source.get("Dockerfile.monitor") == {"monitor"}
    k8s = set().union(*(v for k, v in by_source.items() if k.startswith("deploy/k8s/")))
    assert {"serve", "monitor", "edge"} <= k8s
    assert by_source.get("deploy/k8s/tls/server-tls-patch.yaml") == {"serve"}
    assert {"serve", "edge", "export"} <= by_source.get("deploy/README.md", set())


@pytest.mark.parametrize("inv", INVOCATIONS, ids=[f"{i.source}:{i.argv[0]}" for i in INVOCATIONS])
def test_command_line_parses(inv: Invocation) -> None:
    args = parse_cli(inv.argv)
    if not inv.container:
        return
    if inv.argv[0] in ("serve", "monitor"):
        assert args.host == "0.0.0.0", f"{inv.source}: binds {args.host}, unreachable from outside the container"
    if inv.argv[0] == "serve":
        tls = bool(getattr(args, "tls_cert", None))
        assert tls != bool(getattr(args, "insecure", False)), f"{inv.source}: give either TLS flags or --insecure"
        assert tls == bool(getattr(args, "tls_key", None)), f"{inv.source}: --tls-cert and --tls-key go together"
    if inv.argv[0] == "edge":
        assert getattr(args, "insecure", False) != bool(getattr(args, "tls_ca", None)), \
            f"{inv.source}: give either --tls-ca or --insecure"
        assert args.bundle == "/bundle"


def test_export_in_edge_image_matches_cli_defaults() -> None:
    runs = [i for i in INVOCATIONS if i.source.startswith("Dockerfile.edge") and i.argv[0] == "export"]
    assert len(runs) == 1
    args = parse_cli(runs[0].argv)
    assert (args.checkpoint, args.out) == ("default-mshp", "/bundle")
    serve_default = subparsers()["serve"].get_default("checkpoint")
    assert serve_default == args.checkpoint, "the edge bundle must be the model `splitinfer serve` serves"


# ---------------------------------------------------------------------------------------- tests: images


def _from(path: Path, stage: int | None = None) -> str:
    ins = dockerfile(path)
    stage = max(i.stage for i in ins) if stage is None else stage
    image = next(i.args for i in ins if i.name == "FROM" and i.stage == stage)
    image = re.sub(r"--platform=\S+\s+", "", image).split()[0]
    defaults = dockerfile_args(path)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)


def test_dockerfile_bases_users_and_ports() -> None:
    assert _from(DOCKERFILES["edge"]) == "python:3.11-slim"
    assert _from(DOCKERFILES["monitor"]) == "python:3.11-slim"
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu22\.04", _from(DOCKERFILES["server"]))
    for kind, path in DOCKERFILES.items():
        final = final_stage(path)
        users = [i.args for i in final if i.name == "USER"]
        assert users and users[-1].split(":")[0] == CONTAINER_USER, f"{path.name}: final stage must run as uid 10001"
        assert any(f"--uid {CONTAINER_USER}" in i.args for i in final if i.name == "RUN"), f"{path.name}: no user"
        exposed = {int(p.split("/")[0]) for i in final if i.name == "EXPOSE" for p in i.args.split()}
        want = {"server": {SERVER_PORT}, "monitor": {MONITOR_PORT}, "edge": set()}[kind]
        assert exposed == want, f"{path.name}: EXPOSE {exposed}, expected {want}"
        cmd = exec_or_shell(next(i.args for i in reversed(final) if i.name == "CMD"))
        port = option(cmd, "--port")
        if kind != "edge":
            assert port is not None and int(port) in want, f"{path.name}: CMD --port {port} is not EXPOSEd"


def test_edge_image_is_multistage_and_torch_free() -> None:
    path = DOCKERFILES["edge"]
    ins = dockerfile(path)
    pins = {}
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["full"]:
        name, _, version = dep.partition("==")
        pins[name] = version
    export = [i for i in ins if i.stage == 0]
    assert "--platform=$BUILDPLATFORM" in export[0].args, "export stage should run natively, not emulated"
    torch_install = " ".join(i.args for i in export if i.name == "RUN" and "torch==" in i.args)
    assert "download.pytorch.org/whl/cpu" in " ".join(i.args for i in ins if i.name in ("RUN", "ARG"))
    assert f"torch=={pins['torch']}" in torch_install and f"torchvision=={pins['torchvision']}" in torch_install
    assert any(i.name == "RUN" and "'.[full]'" in i.args for i in export)
    final = final_stage(path)
    installs = [i.args for i in final if i.name == "RUN" and "pip install" in i.args]
    assert installs and all("'.[edge]'" in a and "torch" not in a.split("&&")[0] for a in installs)
    assert not any("[full]" in i.args or "torch==" in i.args for i in final)
    copies = [i.args for i in final if i.name == "COPY" and i.args.startswith("--from=")]
    assert f"--from={export[0].stage_name} /bundle /bundle" in copies
    samples = [c for c in copies if c.endswith("/opt/splitinfer/samples")]
    assert samples, "the demo edge needs the sample images"
    images = ROOT / "splitinfer" / "sample_images"
    assert images.is_dir() and any(images.glob("*/*.jpg")), "splitinfer/sample_images (ImageFolder tree) missing"


def test_dockerfiles_install_what_they_run() -> None:
    server = " ".join(i.args for i in dockerfile(DOCKERFILES["server"]) if i.name == "RUN")
    assert "'.[full]'" in server and "torch==" in server
    monitor = " ".join(i.args for i in dockerfile(DOCKERFILES["monitor"]) if i.name in ("RUN", "ARG"))
    assert "'.[monitor]'" in monitor
    extra = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                     ["monitor"])
    for module in ("fastapi", "uvicorn", "prometheus-client", "matplotlib"):  # what monitor.app imports
        assert module in extra, f"the monitor extra does not install {module}"
    assert "[full]" not in monitor and "torch==" not in monitor


def _dockerignore_matcher() -> tuple[list[str], object]:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.strip().startswith("#")]

    def to_regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + "$")

    rules = [(p.startswith("!"), to_regex(p.lstrip("!").strip("/"))) for p in patterns]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        result = False
        for negate, rx in rules:  # last match wins, a directory's match covers what is below it
            if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                result = not negate
        return result

    return patterns, ignored


def test_dockerignore() -> None:
    patterns, ignored = _dockerignore_matcher()
    for p in (".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "deploy/certs"):
        assert p in patterns, f".dockerignore lacks {p}"
    for path in (".venv/bin/python", "runs/fp.pt", ".git/HEAD", "codec/__pycache__/ans.cpython-311.pyc",
                 "deploy/certs/server.key", "deploy/certs/tokens.yaml", "splitinfer.egg-info/PKG-INFO"):
        assert ignored(path), f"{path} would be sent into the build context"
    needed = ["pyproject.toml", "README.md", "splitinfer/cli.py", "models/checkpoints/default-mshp.pt",
              "models/checkpoints/default-mshp.pt.json", "proto/splitinfer_pb2.py"]
    needed += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "splitinfer" / "sample_images").glob("*/*"))[:3]]
    for include in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
            "include"]:
        needed.append(include.rstrip("*") + "/__init__.py")
    for path in needed:
        assert not ignored(path), f".dockerignore excludes {path}, which the image build needs"


def _health_server(credentials: object = None) -> tuple[object, object, int]:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials is not None
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    return server, servicer, port


def _run_healthcheck(code: str, port: int, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCHECK_")}
    return subprocess.run([sys.executable, "-c", code], env=clean | {"HEALTHCHECK_PORT": str(port)} | env,
                          capture_output=True, timeout=60).returncode


def test_server_healthcheck_uses_grpc_health_service() -> None:
    """The image's HEALTHCHECK, run for real against a gRPC health service on loopback."""
    pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2

    code = healthcheck_code(DOCKERFILES["server"])
    assert "grpc_health.v1" in code and f"'{SERVER_PORT}'" in code, "default port must be the server's"
    server, servicer, port = _health_server()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _run_healthcheck(code, port) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what a draining server reports
        assert _run_healthcheck(code, port) == 1
    finally:
        server.stop(None)
    assert _run_healthcheck(code, port) != 0  # nothing listening


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_gen_certs_and_tls_healthcheck(tmp_path: Path) -> None:
    """deploy/gen-certs.sh makes a CA + server + client certificates that work for mutual TLS, and the image's
    HEALTHCHECK passes over mutual TLS presenting the server certificate (as compose.tls.yml and k8s/tls do)."""
    pytest.importorskip("grpc_health.v1.health")
    import grpc
    from grpc_health.v1 import health_pb2

    out = tmp_path / "certs"
    subprocess.run(["sh", str(DEPLOY / "gen-certs.sh"), str(out), "edge"], check=True, capture_output=True,
                   timeout=120)
    for name in ("ca.crt", "server.crt", "server.key", "edge.crt", "edge.key"):
        assert (out / name).is_file(), name
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.crt"),
                             str(out / "edge.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    sans = subprocess.run(["openssl", "x509", "-in", str(out / "server.crt"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True).stdout
    for name in ("localhost", "server", f"{SERVER_DEPLOYMENT}.{NAMESPACE}.svc.cluster.local"):
        assert f"DNS:{name}" in sans, f"server certificate does not name {name}"

    read = lambda n: (out / n).read_bytes()  # noqa: E731
    creds = grpc.ssl_server_credentials([(read("server.key"), read("server.crt"))], root_certificates=read("ca.crt"),
                                        require_client_auth=True)
    code = healthcheck_code(DOCKERFILES["server"])
    server, servicer, port = _health_server(creds)
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        tls = {"HEALTHCHECK_CA": str(out / "ca.crt")}
        mtls = tls | {"HEALTHCHECK_CERT": str(out / "server.crt"), "HEALTHCHECK_KEY": str(out / "server.key")}
        assert _run_healthcheck(code, port, **mtls) == 0
        edge = mtls | {"HEALTHCHECK_CERT": str(out / "edge.crt"), "HEALTHCHECK_KEY": str(out / "edge.key")}
        assert _run_healthcheck(code, port, **edge) == 0
        assert _run_healthcheck(code, port, **tls) != 0, "mutual TLS must refuse a client without a certificate"
        assert _run_healthcheck(code, port) != 0, "plaintext must not reach a TLS server"
        assert _run_healthcheck(code, port, **mtls | {"HEALTHCHECK_AUTHORITY": "elsewhere.example"}) != 0
    finally:
        server.stop(None)


# --------------------------------------------------------------------------------------- tests: compose


def _service_command(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return [str(a) for a in (cmd if isinstance(cmd, list) else shlex.split(cmd))]


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_files_parse_and_overrides_name_known_services() -> None:
    base = load_compose(COMPOSE_FILE)
    assert {"server", "monitor", "edge", "prometheus"} <= set(base["services"])
    for path in (CPU_OVERRIDE, TLS_OVERRIDE):
        extra = set(load_compose(path)["services"]) - set(base["services"])
        assert not extra, f"{path.name} overrides services docker-compose.yml lacks: {extra}"


def test_compose_images_match_dockerfiles() -> None:
    services = load_compose(COMPOSE_FILE)["services"]
    built: dict[str, str] = {}
    for name, svc in services.items():
        if "build" not in svc:
            continue
        build = svc["build"]
        context = ROOT / build.get("context", ".")
        dockerfile_path = (context / build["dockerfile"]).resolve()
        assert dockerfile_path.is_file(), f"{name}: {build['dockerfile']} does not exist"
        kind = dockerfile_path.name.removeprefix("Dockerfile.")
        assert dockerfile_path == DOCKERFILES[kind].resolve()
        assert svc["image"].split(":")[0] == f"splitinfer/{kind}", f"{name}: image {svc['image']} vs {kind}"
        assert built.setdefault(svc["image"], kind) == kind, f"{svc['image']} built from two Dockerfiles"
    assert set(built.values()) == set(DOCKERFILES)
    for name, svc in services.items():
        if svc["image"].startswith("splitinfer/"):
            assert svc["image"] in built, f"{name}: nothing builds {svc['image']}"
    # Kubernetes runs the same images (kustomization `images:` may retag them)
    for label, _, c in k8s_containers(all_k8s_files()):
        if "image" not in c:  # a patch
            continue
        repo, _, tag = c["image"].partition(":")
        assert f"{repo}:{tag}" in built, f"{label}: {c['image']} is not an image compose builds"
    for img in k8s_kustomization().get("images", []):
        assert any(b.startswith(img["name"] + ":") for b in built), img


def test_compose_server_gpu_and_cpu_fallback() -> None:
    server = load_compose(COMPOSE_FILE)["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert _env(server)["SPLITINFER_SERVER_DEVICE"] == "cuda"
    for path in (COMPOSE_FILE, TLS_OVERRIDE):  # a --device flag would win over the variable the CPU file sets
        cmd = _service_command(load_compose(path)["services"]["server"])
        assert option(cmd, "--device") is None, f"{path.name}: server command sets --device"
    cpu = load_compose(CPU_OVERRIDE)["services"]["server"]
    assert isinstance(cpu.get("deploy"), Reset), "compose.cpu.yml must drop the GPU reservation (!reset)"
    assert _env(cpu)["SPLITINFER_SERVER_DEVICE"] == "cpu"
    assert "command" not in cpu


def test_compose_ports_and_addresses() -> None:
    services = load_compose(COMPOSE_FILE)["services"]
    server, monitor = _service_command(services["server"]), _service_command(services["monitor"])
    assert int(option(server, "--port")) == SERVER_PORT
    assert {int(str(p).split(":")[-1]) for p in services["server"].get("expose", [])} == {SERVER_PORT}
    for p in services["server"].get("ports", []):
        assert int(str(p).split(":")[-1]) == SERVER_PORT
    assert int(option(monitor, "--port")) == MONITOR_PORT
    assert [str(p).split(":")[-1] for p in services["monitor"]["ports"]] == [str(MONITOR_PORT)]
    monitor_url = f"http://monitor:{MONITOR_PORT}"
    assert option(server, "--monitor") == monitor_url
    assert f"127.0.0.1:{MONITOR_PORT}/healthz" in " ".join(services["monitor"]["healthcheck"]["test"])
    relay = _service_command(services["relay"])
    assert host_port(option(relay, "--upstream")) == ("server", SERVER_PORT)
    assert option(relay, "--monitor") == monitor_url
    listen = host_port(option(relay, "--listen"))
    assert listen[0] == "0.0.0.0" and [str(p).split(":")[-1] for p in services["relay"]["ports"]] == [str(listen[1])]
    for path in (COMPOSE_FILE, TLS_OVERRIDE):
        edge = _service_command(load_compose(path)["services"]["edge"])
        assert edge_targets(option(edge, "--server")) == [("server", SERVER_PORT)], path.name
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"monitor:{MONITOR_PORT}"]
    assert prom["scrape_configs"][0].get("metrics_path", "/metrics") == "/metrics"


def test_compose_health_dependencies_and_volumes() -> None:
    doc = load_compose(COMPOSE_FILE)
    services = doc["services"]
    image_health = {f"splitinfer/{k}": bool([i for i in final_stage(p) if i.name == "HEALTHCHECK"])
                    for k, p in DOCKERFILES.items()}
    assert services["edge"]["depends_on"]["server"]["condition"] == "service_healthy"
    for name, svc in services.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if how.get("condition") == "service_healthy":
                target = services[dep]
                has = "test" in (target.get("healthcheck") or {}) or image_health.get(target["image"].split(":")[0])
                assert has, f"{name} waits for {dep} to be healthy, but {dep} has no health check"
                assert not (target.get("healthcheck") or {}).get("disable")
    assert services["prometheus"]["profiles"] == ["metrics"]
    assert services["relay"]["profiles"] == ["relay"]
    named = set(doc.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source, target = str(v).split(":")[:2]
            if source.startswith("."):
                rel = Path(source)
                assert (ROOT / rel).exists() or rel == Path("deploy/certs"), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    mounts = [str(v).split(":")[1] for v in services["monitor"]["volumes"] if not str(v).startswith(".")]
    db = option(_service_command(services["monitor"]), "--db")
    assert any(db.startswith(m.rstrip("/") + "/") for m in mounts), f"--db {db} is not on the named volume"


def test_env_variables_name_real_flags() -> None:
    """SPLITINFER_<SECTION>_<KEY> variables in compose and k8s files set a flag that exists."""
    names: list[tuple[str, str, str | None]] = []
    for path in (COMPOSE_FILE, CPU_OVERRIDE, TLS_OVERRIDE):
        for svc_name, svc in load_compose(path)["services"].items():
            names += [(f"{path.name}:{svc_name}", k, v) for k, v in _env(svc).items()]
    for label, _, c in k8s_containers(all_k8s_files()):
        names += [(label, e["name"], e.get("value")) for e in c.get("env", [])]
    checked = 0
    for label, name, value in names:
        if not name.startswith("SPLITINFER_"):
            continue
        if value is not None and "${" not in value:
            _load_with_splitinfer(None, {name: value})  # the value converts (type, choices)
        section, _, key = name.removeprefix("SPLITINFER_").lower().partition("_")
        assert section in SECTION_COMMANDS, f"{label}: {name}: no config section {section!r}"
        assert key in flag_dests(SECTION_COMMANDS[section]), \
            f"{label}: {name}: `splitinfer {SECTION_COMMANDS[section]}` has no --{key.replace('_', '-')}"
        checked += 1
    assert checked >= 4


# ------------------------------------------------------------------------------------------ tests: config


def _check_config(doc: dict, where: str) -> None:
    assert isinstance(doc, dict) and doc, where
    for section, values in doc.items():
        assert section in SECTION_COMMANDS, f"{where}: unknown section {section!r}"
        known = flag_dests(SECTION_COMMANDS[section]) - {"config"}
        for key in values or {}:
            assert key in known, f"{where}: {section}.{key} is no flag of `splitinfer {SECTION_COMMANDS[section]}`"


def _load_with_splitinfer(path: Path | None, environ: dict[str, str] | None = None) -> None:
    """Read a config file (and environment) the way `splitinfer` does, values converted and checked."""
    config = pytest.importorskip("splitinfer.config")
    subs = subparsers()
    for command, section in config.SECTIONS.items():
        if command in subs:
            try:
                config.overrides(subs[command], section, str(path) if path else None, environ or {})
            except config.ConfigError as exc:
                pytest.fail(str(exc))


def test_config_files_use_real_flags(tmp_path: Path) -> None:
    _check_config(yaml.safe_load((DEPLOY / "splitinfer.example.yaml").read_text()), "splitinfer.example.yaml")
    config = k8s_objects("ConfigMap")["splitinfer-config"]
    _check_config(yaml.safe_load(config["data"]["config.yaml"]), "k8s ConfigMap config.yaml")
    _load_with_splitinfer(DEPLOY / "splitinfer.example.yaml")
    (tmp_path / "config.yaml").write_text(config["data"]["config.yaml"])
    _load_with_splitinfer(tmp_path / "config.yaml")
    example = yaml.safe_load((DEPLOY / "splitinfer.example.yaml").read_text())
    assert example["server"]["port"] == SERVER_PORT and example["monitor"]["port"] == MONITOR_PORT


def test_tokens_example_is_a_token_map() -> None:
    tokens = yaml.safe_load((DEPLOY / "tokens.example.yaml").read_text())
    assert isinstance(tokens, dict) and tokens
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items())
    secret = k8s_objects("Secret")["splitinfer-tokens"]
    assert isinstance(yaml.safe_load(secret["stringData"]["tokens.yaml"]), dict)


# ------------------------------------------------------------------------------------------ tests: k8s


def test_kustomization_lists_existing_manifests() -> None:
    kust = k8s_kustomization()
    assert kust["namespace"] == NAMESPACE
    listed = kust["resources"]
    assert len(set(listed)) == len(listed)
    for r in listed:
        assert (K8S / r).is_file(), f"kustomization.yaml lists missing {r}"
    top = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert top - set(listed) == K8S_EXTRAS, "every manifest is in kustomization.yaml or a known extra"
    for extra in K8S_EXTRAS:
        assert (K8S / extra).is_file()
    for d in (p.parent for p in K8S.glob("*/kustomization.yaml")):
        comp = k8s_kustomization(d)
        assert comp["kind"] == "Component", d
        for patch in comp.get("patches", []):
            assert (d / patch["path"]).is_file(), patch
        assert d.name in (K8S / "kustomization.yaml").read_text(), f"{d.name} component is not mentioned"


def test_k8s_objects_are_well_formed_and_namespaced() -> None:
    kinds = set()
    for f in all_k8s_files():
        for d in yaml.safe_load_all(f.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(d), f
            assert d["metadata"].get("name"), f
            kinds.add(d["kind"])
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == NAMESPACE, f"{f.name}: {d['metadata']['name']}"
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "PersistentVolumeClaim", "ConfigMap", "Secret"} <= kinds
    assert NAMESPACE in k8s_objects("Namespace")


def _pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_deployments_select_their_pods() -> None:
    deployments = k8s_objects("Deployment")
    assert set(deployments) == {SERVER_DEPLOYMENT, "splitinfer-monitor"}
    for name, dep in deployments.items():
        assert _selects(dep["spec"]["selector"]["matchLabels"], _pod_labels(dep)), name
    job = k8s_objects("Job", [K8S / "edge-job.yaml"])["splitinfer-edge-demo"]
    for other in deployments.values():  # the demo's pods must not join a Service
        assert not _selects(other["spec"]["selector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"])


def _container_ports(dep: dict) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for c in dep["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            ports[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def test_services_select_pods_and_ports() -> None:
    deployments = k8s_objects("Deployment")
    services = k8s_objects("Service")
    for name, svc in services.items():
        matched = [d for d in deployments.values() if _selects(svc["spec"]["selector"], _pod_labels(d))]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} Deployments"
        ports = _container_ports(matched[0])
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in ports, f"Service {name}: targetPort {target} is no container port"
            assert ports[target] == p["port"], f"Service {name}: port {p['port']} -> {ports[target]}"
    server_svc = services[SERVER_DEPLOYMENT]
    assert server_svc["spec"]["clusterIP"] == "None", "client-side round-robin needs a headless Service"
    assert [p["port"] for p in server_svc["spec"]["ports"]] == [SERVER_PORT]
    assert [p["port"] for p in services["splitinfer-monitor"]["spec"]["ports"]] == [MONITOR_PORT]


def _container(dep: dict, name: str | None = None) -> dict:
    containers = dep["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def _argv(c: dict) -> list[str]:
    return [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]


def test_server_deployment_gpu_probes_and_port() -> None:
    dep = k8s_objects("Deployment")[SERVER_DEPLOYMENT]
    c = _container(dep)
    argv = _argv(c)
    assert argv[:2] == ["splitinfer", "serve"]
    assert int(option(argv, "--port")) == SERVER_PORT
    assert option(argv, "--device") == "cuda"
    assert _container_ports(dep) == {"grpc": SERVER_PORT, SERVER_PORT: SERVER_PORT}
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"] == {"port": SERVER_PORT}, f"{probe} must be Kubernetes' grpc probe on 50051"
    monitor = urlsplit(option(argv, "--monitor"))
    svc = k8s_objects("Service")[monitor.hostname.split(".")[0]]
    assert monitor.port == svc["spec"]["ports"][0]["port"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(CONTAINER_USER)


def test_monitor_deployment_volume_probes_and_port() -> None:
    dep = k8s_objects("Deployment")["splitinfer-monitor"]
    c = _container(dep)
    argv = _argv(c)
    assert argv[:2] == ["splitinfer", "monitor"]
    assert int(option(argv, "--port")) == MONITOR_PORT
    assert _container_ports(dep)["http"] == MONITOR_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": MONITOR_PORT}
    assert dep["spec"]["strategy"]["type"] == "Recreate", "SQLite on a RWO volume: never two pods at once"
    assert dep["spec"].get("replicas", 1) == 1
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    data = next(m for m in c["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]])
    assert option(argv, "--db").startswith(data["mountPath"].rstrip("/") + "/"), "the database must be on the PVC"
    claim = volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in k8s_objects("PersistentVolumeClaim")
    assert dep["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == int(CONTAINER_USER)


def test_volumes_and_env_reference_existing_objects() -> None:
    configmaps, secrets = k8s_objects("ConfigMap"), k8s_objects("Secret")
    files = [K8S / r for r in k8s_kustomization()["resources"]] + sorted(K8S.glob("*/*.yaml"))
    files = [f for f in files if f.name != "kustomization.yaml"]
    for label, obj, c in k8s_containers(files):
        pod = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{label}: {v}"
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{label}: {v}"
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"{label}: {ref}"


def test_no_service_links_that_read_as_settings() -> None:
    """Kubernetes puts <SERVICE>_SERVICE_HOST, <SERVICE>_PORT=tcp://... for every ClusterIP Service into each pod;
    for Services named splitinfer-<section> those read as SPLITINFER_<SECTION>_<KEY> settings, which splitinfer
    refuses (unknown key) or misreads (port "tcp://..."). Such pods must set enableServiceLinks: false."""
    injected = []
    for name, svc in k8s_objects("Service").items():
        if svc["spec"].get("clusterIP") == "None":
            continue  # headless Services inject nothing
        env = name.upper().replace("-", "_")
        injected += [f"{env}_SERVICE_HOST", f"{env}_PORT"]
    prefixes = tuple(f"SPLITINFER_{section.upper()}_" for section in SECTION_COMMANDS)
    clashing = [v for v in injected if v.startswith(prefixes)]
    assert clashing, "expected splitinfer-monitor's variables to clash (else this test checks nothing)"
    for f, obj in k8s_docs(all_k8s_files()):
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if pod and "containers" in pod and "image" in pod["containers"][0]:
            assert pod.get("enableServiceLinks") is False, f"{f.name}: {obj['metadata']['name']} would get {clashing}"


def test_hpa_targets_server_deployment() -> None:
    hpas = k8s_objects("HorizontalPodAutoscaler")
    assert len(hpas) == 1
    (hpa,) = hpas.values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", SERVER_DEPLOYMENT)
    assert ref["name"] in k8s_objects("Deployment")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["metrics"]
    dep = k8s_objects("Deployment")[SERVER_DEPLOYMENT]
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Resource" and m["resource"]["target"]["type"] == "Utilization":
            resource = m["resource"]["name"]
            for c in dep["spec"]["template"]["spec"]["containers"]:
                assert resource in c["resources"]["requests"], f"Utilization of {resource} needs a request"


def test_pdb_selects_server_pods_and_allows_drains() -> None:
    (pdb,) = k8s_objects("PodDisruptionBudget").values()
    dep = k8s_objects("Deployment")[SERVER_DEPLOYMENT]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(dep))
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (hpa,) = k8s_objects("HorizontalPodAutoscaler").values()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "minAvailable >= replicas blocks every drain"


def test_edge_job_targets_headless_service() -> None:
    job = k8s_objects("Job", [K8S / "edge-job.yaml"])["splitinfer-edge-demo"]
    argv = _argv(job["spec"]["template"]["spec"]["containers"][0])
    server = option(argv, "--server")
    assert server.startswith("dns:///"), "one DNS name for all server pods (round_robin over its addresses)"
    ((host, port),) = edge_targets(server)
    svc = k8s_objects("Service")[SERVER_DEPLOYMENT]
    assert host == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert port == svc["spec"]["ports"][0]["port"] and svc["spec"]["clusterIP"] == "None"


def test_tls_component_patches_the_server() -> None:
    patch_file = K8S / "tls" / "server-tls-patch.yaml"
    patch = yaml.safe_load(patch_file.read_text())
    dep = k8s_objects("Deployment")[patch["metadata"]["name"]]
    assert patch["kind"] == "Deployment" and patch["metadata"]["name"] == SERVER_DEPLOYMENT
    pc = patch["spec"]["template"]["spec"]["containers"][0]
    base = _container(dep, pc["name"])
    argv = base["command"] + pc["args"]
    assert option(argv, "--port") == option(_argv(base), "--port") and "--insecure" not in argv
    code = healthcheck_code(DOCKERFILES["server"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe in base
        assert pc[probe]["grpc"] is None, f"{probe}: the plaintext grpc probe must be removed under TLS"
        assert pc[probe]["exec"]["command"] == ["python", "-c", code], f"{probe}: not the image's health check"
    env = {e["name"]: e.get("value") for e in pc["env"]}
    assert env["HEALTHCHECK_PORT"] == str(SERVER_PORT)
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in pc["volumeMounts"]}
    volumes = {v["name"]: v for v in patch["spec"]["template"]["spec"]["volumes"]}
    secrets = k8s_objects("Secret")
    files = [option(argv, f) for f in ("--tls-cert", "--tls-key", "--tls-client-ca", "--tokens")]
    files += [env[k] for k in ("HEALTHCHECK_CA", "HEALTHCHECK_CERT", "HEALTHCHECK_KEY")]
    for path in files:
        assert path, "TLS flag missing from the patched command"
        directory, _, key = path.rpartition("/")
        secret = secrets[volumes[mounts[directory]]["secret"]["secretName"]]
        assert key in secret["stringData"], f"{path}: Secret {secret['metadata']['name']} has no key {key}"
    assert dep["spec"]["template"]["spec"]["securityContext"].get("fsGroup") == int(CONTAINER_USER), \
        "Secret files (mode 0440) must be readable by the non-root user"
