"""TLS, mutual TLS and bearer tokens on a real loopback server; the configuration file and its overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from edge_client.client import EdgeClient, Security
from edge_client.runtime import EdgeBundle, EdgeEncoder
from server.service import RunningServer, ServerConfig
from splitinfer.certs import make_certs
from splitinfer.cli import _subcommands, build_parser, main
from splitinfer.config import ConfigError, apply, effective

from .conftest import eval_images


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    files = make_certs(d / "good", ["localhost", "127.0.0.1"], ["edge-a"])
    other = make_certs(d / "other", ["localhost", "127.0.0.1"], ["stranger"])
    tokens = d / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": {"tok-edge-a-0123456789": "edge-a"}}))
    return files | {"tokens": tokens, "other_ca": other["ca"], "stranger": other["stranger"],
                    "stranger_key": other["stranger_key"]}


@pytest.fixture(scope="module")
def encoded(bundles: dict[str, Path]):
    images, _ = eval_images(2)
    encoder = EdgeEncoder(bundles["fp"])
    return encoder.bundle, encoder.encode(images)[0]


def _start(pki: dict[str, Path], mutual: bool) -> tuple[RunningServer, list[dict]]:
    server = RunningServer(ServerConfig(checkpoint="default-fp", port=0, tls_cert=str(pki["server"]),
                                        tls_key=str(pki["server_key"]), tokens=str(pki["tokens"]),
                                        tls_client_ca=str(pki["ca"]) if mutual else None))
    records: list[dict] = []
    server.service.recorder = records.append
    return server, records


def _call(server: RunningServer, bundle: EdgeBundle, enc, security: Security, claimed: str = "claimed-id"):
    client = EdgeClient(f"127.0.0.1:{server.port}", bundle, timeout=5, retries=0, client_id=claimed, check=False,
                        security=security)
    try:
        return client.send(client.request(enc, tag="clean"))
    finally:
        client.close()


def test_tls_and_tokens(pki: dict[str, Path], encoded) -> None:
    bundle, enc = encoded
    server, records = _start(pki, mutual=False)
    good = Security(tls_ca=str(pki["ca"]), token="tok-edge-a-0123456789")
    try:
        reply = _call(server, bundle, enc, good)
        assert reply.top_k and records[-1]["client_id"] == "edge-a"  # the token's identity, not the claimed one
        for sec, code in [(Security(insecure=True, token="tok-edge-a-0123456789"), grpc.StatusCode.UNAVAILABLE),
                          (Security(tls_ca=str(pki["other_ca"]), token="tok-edge-a-0123456789"),
                           grpc.StatusCode.UNAVAILABLE),
                          (Security(tls_ca=str(pki["ca"]), token="wrong-token-000000"),
                           grpc.StatusCode.UNAUTHENTICATED),
                          (Security(tls_ca=str(pki["ca"])), grpc.StatusCode.UNAUTHENTICATED)]:
            with pytest.raises(grpc.RpcError) as err:
                _call(server, bundle, enc, sec)
            assert err.value.code() == code, sec
        n = len(records)
        client = EdgeClient(f"127.0.0.1:{server.port}", bundle, timeout=5, check=False,
                            security=Security(tls_ca=str(pki["ca"]), token="nope-nope-nope"))
        with pytest.raises(grpc.RpcError) as err:
            list(client.infer_stream([client.request(enc)], timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            client.check_server()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.close()
        assert len(records) == n  # refused before any decoding
        assert _call(server, bundle, enc, good).top_k  # and still serving
    finally:
        server.stop(1)


def test_mutual_tls(pki: dict[str, Path], encoded) -> None:
    bundle, enc = encoded
    server, _ = _start(pki, mutual=True)
    tok = "tok-edge-a-0123456789"
    try:
        assert _call(server, bundle, enc, Security(tls_ca=str(pki["ca"]), tls_cert=str(pki["edge-a"]),
                                                   tls_key=str(pki["edge-a_key"]), token=tok)).top_k
        for sec in (Security(tls_ca=str(pki["ca"]), token=tok),  # no client certificate
                    Security(tls_ca=str(pki["ca"]), tls_cert=str(pki["stranger"]), tls_key=str(pki["stranger_key"]),
                             token=tok)):  # certificate from another CA
            with pytest.raises(grpc.RpcError) as err:
                _call(server, bundle, enc, sec)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(1)


def test_plaintext_only_when_asked(pki: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--port", "0"]) == 2
    assert "refusing to serve plaintext" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--tls-cert", str(pki["server"])]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    with pytest.raises(ValueError, match="contradicts"):
        Security(insecure=True, tls_ca=str(pki["ca"])).credentials()
    with pytest.raises(ValueError, match="no such file"):
        Security(tls_ca="/nonexistent/ca.pem").credentials()


def test_config_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "splitinfer.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": 6000, "max_batch": 8, "insecure": True},
                                   "edge": {"server": "a:1,b:2", "images": ["x.png", "y.png"], "timeout": 3},
                                   "monitor": {"db": "/data/m.sqlite3"}}))
    env = {"SPLITINFER_SERVER_MAX_BATCH": "16", "SPLITINFER_EDGE_INSECURE": "yes"}
    parser = build_parser()
    argv = ["serve", "--config", str(cfg), "--max-delay-ms", "2"]
    apply(_subcommands(parser), argv, env)
    args = parser.parse_args(argv)
    assert (args.port, args.max_batch, args.max_delay_ms, args.insecure) == (6000, 16, 2.0, True)
    parser = build_parser()
    argv = ["serve", "--config", str(cfg), "--max-batch", "4"]
    apply(_subcommands(parser), argv, env)
    assert parser.parse_args(argv).max_batch == 4  # flag > env > file
    eff = effective(_subcommands(build_parser()), str(cfg), env)
    assert eff["edge"]["images"] == ["x.png", "y.png"] and eff["edge"]["insecure"] is True
    assert eff["edge"]["timeout"] == 3.0 and eff["monitor"]["db"] == "/data/m.sqlite3"
    assert eff["monitor"]["host"] == "127.0.0.1"  # the monitor binds loopback unless configured


@pytest.mark.parametrize("doc,env,message", [
    ({"server": {"max_bach": 3}}, {}, "server.max_bach is not a setting"),
    ({"server": {"port": "eighty"}}, {}, "server.port: 'eighty' is not a valid int"),
    ({"servers": {}}, {}, "unknown section"),
    ({"server": {"insecure": "maybe"}}, {}, "expected true or false"),
    ({}, {"SPLITINFER_SERVER_PROT": "1"}, "SPLITINFER_SERVER_PROT names no setting"),
    ({"server": {"device": ["cpu"]}}, {}, "expected a single value"),
])
def test_config_errors_name_the_key(tmp_path: Path, doc: dict, env: dict, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        apply(_subcommands(build_parser()), ["serve", "--config", str(cfg)], env)


def test_config_cli_prints_effective_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("monitor:\n  port: 9100\n")
    out = subprocess.run([sys.executable, "-m", "splitinfer.cli", "config", "--config", str(cfg)],
                         capture_output=True, text=True, env={"SPLITINFER_SERVER_PORT": "7000", "PATH": ""},
                         check=True).stdout
    doc = yaml.safe_load(out)
    assert doc["monitor"]["port"] == 9100 and doc["server"]["port"] == 7000 and doc["edge"]["insecure"] is False
    bad = subprocess.run([sys.executable, "-m", "splitinfer.cli", "serve", "--config", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "deploy" / "splitinfer.example.yaml"
    eff = effective(_subcommands(build_parser()), str(example), {})
    assert set(eff) >= {"server", "edge", "monitor"}
