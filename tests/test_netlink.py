"""The emulated link (network namespaces + veth + tbf): shapes to its rate and always tears down.

Skips, with the reason, where the machine cannot build namespaces (not root, no iproute2)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from splitinfer.netlink import SERVER_IP, EmulatedLink, available

OK, WHY = available()
pytestmark = pytest.mark.skipif(not OK, reason=f"emulated link unavailable here: {WHY}")

SINK = f"""import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(({SERVER_IP!r}, 9999)); s.listen()
while True:
    c, _ = s.accept(); n = 0
    while (d := c.recv(65536)):
        n += len(d)
    if n:
        c.close(); print(n, flush=True); break
"""
SOURCE = (f"import socket; s = socket.create_connection(({SERVER_IP!r}, 9999)); s.sendall(b'x' * 200000); "
          "s.shutdown(socket.SHUT_WR); s.recv(1)")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_link_shapes_to_its_rate_and_tears_down() -> None:
    rate_kbit = 800
    with EmulatedLink(rate_kbit=rate_kbit) as link:
        names = link.namespaces.values()
        assert all(n in _namespaces() for n in names)
        sink = link.popen("server", [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        link.wait_port(9999)
        t0 = time.monotonic()
        link.run("client", [sys.executable, "-c", SOURCE], timeout=60, check=True)
        got = int(sink.communicate(timeout=30)[0])
        seconds = time.monotonic() - t0
    assert got == 200000
    kbit_s = got * 8 / seconds / 1000
    assert 0.5 * rate_kbit < kbit_s < 1.1 * rate_kbit, kbit_s  # payload rate just under the shaped rate
    assert not any(n in _namespaces() for n in names)


def test_teardown_after_an_error() -> None:
    link = EmulatedLink(rate_kbit=100)
    with pytest.raises(RuntimeError, match="boom"), link:
        link.popen("server", ["sleep", "30"])
        raise RuntimeError("boom")
    assert all(p.poll() is not None for p in link.procs)
    assert not any(n in _namespaces() for n in link.namespaces.values())


def test_link_command_runs_server_and_client_across() -> None:
    from splitinfer.cli import main

    server = f"{sys.executable} -m http.server 8765 --bind {SERVER_IP}"
    fetch = f"import urllib.request; urllib.request.urlopen('http://{SERVER_IP}:8765/', timeout=10)"
    ok = f'{sys.executable} -c "{fetch}"'
    assert main(["link", "--rate-kbit", "1000", "--port", "8765", "--server-cmd", server, "--client-cmd", ok]) == 0
    fail = f"{sys.executable} -c \"raise SystemExit(7)\""
    assert main(["link", "--rate-kbit", "1000", "--port", "8765", "--server-cmd", server, "--client-cmd", fail]) == 7
    assert "-srv" not in _namespaces()
