"""A small TCP fault proxy between clients and a real server, for tests.

It forwards bytes both ways and understands just enough RESP to keep requests and replies in
step, so a test can make the server *seem* to answer a chosen command with an error (READONLY,
OOM, MOVED...), lose the reply to a chosen command (the connection is cut right after the
request reached the server), or cut every connection::

    with FaultProxy(server_port) as proxy:
        client = conveyor.connect(proxy.url)
        proxy.inject("XREADGROUP", b"-READONLY You can't write against a read only replica.",
                     times=3)
        proxy.lose_reply("XREADGROUP", times=5)
        proxy.cut()
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

Match = Callable[[list[bytes]], bool]

__all__ = ["FaultProxy"]


def _line_end(buf: bytes | bytearray, pos: int) -> int | None:
    end = buf.find(b"\r\n", pos)
    return None if end < 0 else end


def reply_end(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """Where the RESP2/RESP3 reply starting at ``pos`` ends, or None while it is incomplete."""
    if pos >= len(buf):
        return None
    kind = buf[pos : pos + 1]
    end = _line_end(buf, pos)
    if end is None:
        return None
    head = bytes(buf[pos + 1 : end])
    after = end + 2
    if kind in b"+-:_,#(":
        return after
    if kind in b"$=!":
        size = int(head)
        if size < 0:
            return after
        return after + size + 2 if len(buf) >= after + size + 2 else None
    if kind in b"*~>%|":
        count = int(head)
        if count < 0:
            return after
        if kind in b"%|":
            count *= 2
        for _ in range(count):
            nxt = reply_end(buf, after)
            if nxt is None:
                return None
            after = nxt
        if kind == b"|":  # attributes come before the reply they describe
            return reply_end(buf, after)
        return after
    raise ValueError(f"not RESP: {bytes(buf[pos : pos + 20])!r}")


def request_end(buf: bytes | bytearray, pos: int = 0) -> tuple[int, list[bytes]] | None:
    """The end of the request (an array of bulk strings) at ``pos`` and its arguments."""
    end = _line_end(buf, pos)
    if end is None:
        return None
    if buf[pos : pos + 1] != b"*":  # an inline command
        return end + 2, bytes(buf[pos:end]).split()
    args: list[bytes] = []
    at = end + 2
    for _ in range(int(buf[pos + 1 : end])):
        line = _line_end(buf, at)
        if line is None:
            return None
        size = int(buf[at + 1 : line])
        if len(buf) < line + 2 + size + 2:
            return None
        args.append(bytes(buf[line + 2 : line + 2 + size]))
        at = line + 2 + size + 2
    return at, args


@dataclass
class _Rule:
    match: Match
    times: int
    reply: bytes | None  # None: forward, then lose the reply (cut the connection)
    hits: int = 0


def _matcher(command: str | Match) -> Match:
    if callable(command):
        return command
    name = command.upper().encode()
    return lambda args: bool(args) and args[0].upper() == name


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    # What each request sent on is waiting for, in order: ("server", lose) or ("inject", reply)
    waiting: deque[tuple[str, object]] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """A loopback TCP proxy to ``127.0.0.1:<target_port>`` that injects faults on request."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._rules: list[_Rule] = []
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._closed = False
        #: error replies sent in place of the server's, and replies lost, so far
        self.injected = 0
        self.lost = 0
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- faults --------------------------------------------------------------------------------

    def inject(self, command: str | Match, reply: bytes, *, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``command`` with ``reply`` (a raw RESP
        error such as ``b"-READONLY ..."``) instead of forwarding them."""
        if not reply.endswith(b"\r\n"):
            reply += b"\r\n"
        with self._lock:
            self._rules.append(_Rule(_matcher(command), times, reply))

    def lose_reply(self, command: str | Match, *, times: int = 1) -> None:
        """Forward the next ``times`` requests matching ``command``, then cut the client's
        connection instead of passing their reply on: the server did the work, the client
        never hears of it."""
        with self._lock:
            self._rules.append(_Rule(_matcher(command), times, None))

    def cut(self) -> None:
        """Cut every connection open now (clients see a reset)."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def clear(self) -> None:
        """Forget every fault still waiting to happen."""
        with self._lock:
            self._rules.clear()

    def pending_faults(self) -> int:
        with self._lock:
            return sum(r.times - r.hits for r in self._rules)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._replies, args=(link,), daemon=True).start()

    def _rule_for(self, args: list[bytes]) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.hits < rule.times and rule.match(args):
                    rule.hits += 1
                    return rule
        return None

    def _flush_injected(self, link: _Link) -> None:
        """Send the injected replies that are next in line (call with link.lock held)."""
        while link.waiting and link.waiting[0][0] == "inject":
            _, reply = link.waiting.popleft()
            assert isinstance(reply, bytes)
            link.client.sendall(reply)
            self.injected += 1

    def _requests(self, link: _Link) -> None:
        buf = bytearray()
        try:
            while not link.closed:
                data = link.client.recv(65536)
                if not data:
                    break
                buf += data
                out = bytearray()
                pos = 0
                while (found := request_end(buf, pos)) is not None:
                    end, args = found
                    rule = self._rule_for(args)
                    with link.lock:
                        if rule is not None and rule.reply is not None:
                            if out:  # keep the order: what came before goes first
                                link.server.sendall(out)
                                out.clear()
                            link.waiting.append(("inject", rule.reply))
                            self._flush_injected(link)
                        else:
                            link.waiting.append(("server", rule is not None))
                            out += buf[pos:end]
                    pos = end
                if out:
                    link.server.sendall(out)
                del buf[:pos]
        except OSError:
            pass
        finally:
            link.close()

    def _replies(self, link: _Link) -> None:
        buf = bytearray()
        try:
            while not link.closed:
                data = link.server.recv(65536)
                if not data:
                    break
                buf += data
                pos = 0
                while (end := reply_end(buf, pos)) is not None:
                    with link.lock:
                        lose = False
                        if link.waiting and link.waiting[0][0] == "server":
                            lose = bool(link.waiting.popleft()[1])
                        if lose:
                            self.lost += 1
                            link.close()
                            return
                        link.client.sendall(bytes(buf[pos:end]))
                        self._flush_injected(link)
                    pos = end
                del buf[:pos]
        except OSError:
            pass
        finally:
            link.close()
