"""Startup checks: once per process and server, a consumer warns about settings and versions
under which streams lose data (AOF off, eviction, Redis releases with stream bugs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import conveyor
from conveyor import _startup
from conveyor._core.server_checks import parse_info, startup_warnings
from conveyor.server import EmbeddedServer
from tests.conftest import Drivers


@pytest.fixture
def checked_server(drivers: Drivers) -> Iterator[EmbeddedServer]:
    """A server of its own without persistence, checked like any other (not skipped)."""
    server = EmbeddedServer().start()
    where = f"127.0.0.1:{server.port}"
    with _startup._lock:
        _startup._checked.discard(where)
    yield server
    server.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "conveyor.server"]


def test_aof_off_and_eviction_are_warned_about_once_per_server(
    drivers: Drivers, checked_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = conveyor.connect(checked_server.url)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    client = conveyor.connect(checked_server.url, asyncio=drivers.kind == "async")
    with caplog.at_level(logging.WARNING, logger="conveyor.server"):
        for _ in range(3):  # three consumers, one process: one warning each
            c = drivers.consumer("orders", "g", client=client, max_wait_ms=10)
            c.get_batch()
            c.close()
    lines = warnings_of(caplog)
    where = f"127.0.0.1:{checked_server.port}"
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{where}: AOF is off (appendonly no): a restart or failover")
    assert lines[1].startswith(f"{where}: maxmemory-policy is allkeys-lru: under memory")
    admin.close()


def test_a_server_with_aof_and_noeviction_gets_no_warning(
    drivers: Drivers, checked_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = conveyor.connect(checked_server.url)
    admin.config_set("appendonly", "yes")
    client = conveyor.connect(checked_server.url, asyncio=drivers.kind == "async")
    with caplog.at_level(logging.DEBUG, logger="conveyor.server"):
        c = drivers.consumer("orders", "g", client=client, max_wait_ms=10)
        c.get_batch()
        c.close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    admin.close()


def test_embedded_servers_without_persistence_are_not_checked(
    drivers: Drivers, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="conveyor.server"):
        c = drivers.consumer("orders", "g", max_wait_ms=10)
        c.get_batch()
        c.close()
    assert warnings_of(caplog) == []


@pytest.mark.parametrize(
    ("version", "warned"),
    [
        ("6.2.6", ["does not report entries deleted", "CVE-2022-35951"]),
        ("6.2.14", ["does not report entries deleted"]),
        ("7.0.0", ["CVE-2022-31144"]),
        ("7.0.4", ["CVE-2022-31144"]),
        ("7.0.5", []),
        ("7.0.15", []),
        ("7.2.4", []),
    ],
)
def test_redis_versions_with_stream_bugs(version: str, warned: list[str]) -> None:
    info = parse_info(
        f"# Server\r\nredis_version:{version}\r\n\r\n# Persistence\r\naof_enabled:1\r\n"
    )
    lines = startup_warnings(info)
    assert len(lines) == len(warned), lines
    assert all(
        w in line and line.startswith(f"Redis {version}: ")
        for w, line in zip(warned, lines, strict=True)
    )


def test_valkey_is_judged_by_its_own_version_not_redis_version() -> None:
    info = {"redis_version": "7.0.0", "server_name": "valkey", "valkey_version": "9.1.2"}
    assert startup_warnings(info) == []
    assert startup_warnings({}) == []  # a managed service that hides INFO fields
