"""A bandwidth-limited link on one machine: two network namespaces joined by a veth pair, ``tbf`` on both ends.

Why: the harm of inflated streams is a shared link filling up; loopback has no such limit. The server runs in one
namespace, the clients in the other, and every byte between them crosses a token-bucket-shaped veth. ``netem``
(delay, loss) is not available in this kernel: delay can be added in a user-space relay instead.
Needs root (``ip netns``, ``tc``); ``available()`` says whether this machine can build it. Everything is torn
down on exit, also after an error.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

SERVER_IP = "10.231.0.1"
CLIENT_IP = "10.231.0.2"


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")


def available() -> tuple[bool, str]:
    """(True, "") when namespaces, veth and tbf can be built here; else (False, why)."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return False, "needs iproute2 (ip, tc)"
    probe = f"siprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except OSError as exc:
        return False, f"cannot create network namespaces: {exc}"
    return True, ""


@dataclass
class EmulatedLink:
    """``with EmulatedLink(rate_kbit=256) as link: link.popen("server", [...])``."""

    rate_kbit: float
    burst_bytes: int = 3200
    queue_ms: int = 1000  # tbf's latency: how long a packet may wait before it is dropped
    name: str = field(default_factory=lambda: f"si{os.getpid() % 100000}")
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def namespaces(self) -> dict[str, str]:
        return {"server": f"{self.name}-srv", "client": f"{self.name}-cli"}

    def __enter__(self) -> EmulatedLink:
        ns = self.namespaces
        try:
            for n in ns.values():
                _run("ip", "netns", "add", n)
            vs, vc = f"{self.name}s", f"{self.name}c"
            _run("ip", "link", "add", vs, "type", "veth", "peer", "name", vc)
            for dev, side, ip in ((vs, "server", SERVER_IP), (vc, "client", CLIENT_IP)):
                _run("ip", "link", "set", dev, "netns", ns[side])
                _run("ip", "-n", ns[side], "addr", "add", f"{ip}/24", "dev", dev)
                _run("ip", "-n", ns[side], "link", "set", dev, "up")
                _run("ip", "-n", ns[side], "link", "set", "lo", "up")
                # no offloads: tbf then shapes real packet sizes (with GSO a "packet" can be 64 kB)
                subprocess.run(["ip", "netns", "exec", ns[side], "ethtool", "-K", dev, "gso", "off", "tso", "off",
                                "gro", "off"], capture_output=True)
                _run("ip", "netns", "exec", ns[side], "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                     f"{self.rate_kbit}kbit", "burst", str(self.burst_bytes), "latency", f"{self.queue_ms}ms")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def popen(self, side: str, cmd: list[str], **kw: object) -> subprocess.Popen:
        """Start ``cmd`` in the ``server`` or ``client`` namespace; it is killed on exit."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[side], *cmd], **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def run(self, side: str, cmd: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespaces[side], *cmd], timeout=timeout,  # type: ignore[call-overload]
                              **kw)

    def wait_port(self, port: int, timeout: float = 60.0) -> None:
        """Wait until the server namespace accepts TCP connections on ``port`` (probed from the client side)."""
        deadline = time.monotonic() + timeout
        probe = (f"import socket,sys; s=socket.socket(); s.settimeout(1); "
                 f"sys.exit(s.connect_ex(({SERVER_IP!r}, {port})))")
        while time.monotonic() < deadline:
            if self.run("client", ["python3", "-c", probe], timeout=10, capture_output=True).returncode == 0:
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a process in the emulated link exited before its port opened")
            time.sleep(0.5)
        raise TimeoutError(f"nothing listens on {SERVER_IP}:{port} after {timeout:.0f} s")

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for n in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)  # also removes its veth end


def run_pair(rate_kbit: float, server_cmd: str, client_cmd: str, port: int = 50051, timeout: float = 3600) -> int:
    """Server command in one namespace, client command in the other, over the shaped link; client's exit code."""
    ok, why = available()
    if not ok:
        raise OSError(f"emulated link unavailable: {why}")
    with EmulatedLink(rate_kbit) as link:
        link.popen("server", shlex.split(server_cmd))
        link.wait_port(port)
        return link.run("client", shlex.split(client_cmd), timeout=timeout).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
