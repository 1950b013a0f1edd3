"""A counting TCP relay between edges and a server: the TCP-depth byte counter of the monitor.

gRPC interceptors see objects, not bytes, and HTTP/2 framing, headers, flow control and pings are invisible
from inside the server; a relay that the edge connects to instead of the server sees every byte of the TCP
stream. It counts bytes per connection in each direction (TCP payload; IP/TCP headers are not visible to a
socket) and reports each connection with the address its *upstream* socket has, which is the peer the server
sees (``context.peer()``), so the monitor can join connections to the requests they carried.

Runs an asyncio loop in a background thread so that tests, the demo and ``splitinfer relay`` share it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field

from .reporter import MonitorReporter

CHUNK = 1 << 16


def grpc_peer(sockname: tuple) -> str:
    """An address in the form gRPC's ``context.peer()`` gives it (``ipv4:127.0.0.1:5000``)."""
    host, port = sockname[0], sockname[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


@dataclass
class Connection:
    conn_id: str
    client_peer: str
    upstream_peer: str
    opened: float
    closed: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    reported: tuple[int, int, bool] = field(default=(-1, -1, False))

    def record(self, relay: str) -> dict:
        return {"conn_id": self.conn_id, "relay": relay, "client_peer": self.client_peer,
                "upstream_peer": self.upstream_peer, "opened": self.opened, "closed": self.closed,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


class CountingRelay:
    """Listen on ``listen``, forward every connection to ``upstream``, count and report bytes."""

    def __init__(self, upstream: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 reporter: MonitorReporter | None = None, report_interval: float = 1.0) -> None:
        self.upstream = upstream
        self.listen = listen
        self.reporter = reporter
        self.report_interval = report_interval
        self.connections: dict[str, Connection] = {}
        self.port = 0
        self.name = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._error: BaseException | None = None

    # ---------------------------------------------------------------------------------------------- control
    def start(self) -> CountingRelay:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise OSError(f"relay cannot listen on {self.listen[0]}:{self.listen[1]}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def totals(self) -> dict[str, int]:
        conns = list(self.connections.values())
        return {"connections": len(conns), "bytes_up": sum(c.bytes_up for c in conns),
                "bytes_down": sum(c.bytes_down for c in conns)}

    # ------------------------------------------------------------------------------------------------ loop
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, self.listen[0], self.listen[1]))
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self.name = f"{self.listen[0]}:{self.port}"
        self._tasks.add(self._loop.create_task(self._report_loop()))
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):  # the reporting loop and every open connection
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._report(final=True)

    def _report(self, final: bool = False) -> None:
        if self.reporter is None:
            return
        for c in list(self.connections.values()):
            state = (c.bytes_up, c.bytes_down, c.closed is not None)
            if state != c.reported:
                self.reporter.report("connections", c.record(self.name))
                c.reported = state

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval)
            self._report()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        conn = Connection(uuid.uuid4().hex, grpc_peer(writer.get_extra_info("peername")),
                          grpc_peer(up_writer.get_extra_info("sockname")), time.time())
        self.connections[conn.conn_id] = conn
        self._report()  # the join key must reach the monitor even for a connection that never closes cleanly

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while data := await src.read(CHUNK):
                    if up:
                        conn.bytes_up += len(data)
                    else:
                        conn.bytes_down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    dst.close()
                except (ConnectionError, OSError):
                    pass

        try:
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        except asyncio.CancelledError:  # the relay is shutting down
            for w in (writer, up_writer):
                w.close()
        finally:
            conn.closed = time.time()
            self._report()
            self._tasks.discard(task)
