"""connect(): safe defaults, TLS options, and no password in any repr, log or error."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import redis
import redis.asyncio

import conveyor
from conveyor import ConfigError, ConnectionLost, Consumer, EmbeddedServer, Producer
from conveyor.server import free_port


def test_connect_reads_redis_url(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    client = conveyor.connect()
    assert client.ping() is True
    client.close()


def test_no_automatic_retry_and_keepalive(redis_url: str) -> None:
    client = conveyor.connect(redis_url)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["retry"].get_retries() == 0
    assert kwargs["socket_keepalive"] is True
    client.close()


async def test_asyncio_client(redis_url: str) -> None:
    client = conveyor.connect(redis_url, asyncio=True)
    assert isinstance(client, redis.asyncio.Redis)
    assert await client.ping() is True
    await client.aclose()


@pytest.mark.parametrize("url", ["ftp://h:1", "http://user:sekret@h:1"])
def test_bad_scheme_is_named_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match="scheme") as info:
        conveyor.connect(url)
    assert "sekret" not in str(info.value)


def test_the_password_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://user:sekret@127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.DEBUG):
        client = conveyor.connect(url)
        consumer = Consumer(client, "s", "g", max_wait_ms=10)
        with pytest.raises(ConnectionLost) as info:
            consumer.get_batch()
        with pytest.raises(ConnectionLost) as info2:
            Producer(client, "s").send({"a": 1})
    for text in (repr(client), repr(consumer), str(info.value), str(info2.value), caplog.text):
        assert "sekret" not in text
    assert "127.0.0.1" in str(info.value)


def test_unverified_tls_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        conveyor.connect("rediss://u:sekret@localhost:6380/0?ssl_cert_reqs=none")
    assert "verification is OFF" in caplog.text and "sekret" not in caplog.text


def test_tls_options_without_tls_are_refused() -> None:
    with pytest.raises(ConfigError, match="rediss://"):
        conveyor.connect("redis://localhost:6379/0", ssl_ca_certs="/ca.pem")


def test_tls_options_are_passed_through(tmp_path: object) -> None:
    client = conveyor.connect(
        "rediss://localhost:6380/0",
        ssl_ca_certs="/ca.pem",
        ssl_certfile="/c.pem",
        ssl_keyfile="/k.pem",
    )
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/ca.pem" and kwargs["ssl_certfile"] == "/c.pem"
    assert client.connection_pool.connection_class is redis.SSLConnection


def test_an_unsupported_client_is_named() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        Consumer(object(), "s", "g")


def test_valkey_urls_work(redis_url: str) -> None:
    client = conveyor.connect(redis_url.replace("redis://", "valkey://", 1))
    assert client.ping() is True
    client.close()


def test_a_unix_socket_url_works_for_consumers(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    binary = os.environ.get("CONVEYOR_TEST_SERVER") or None
    with EmbeddedServer(binary, extra_args=("--unixsocket", str(socket_path))):
        client = conveyor.connect(f"unix://{socket_path}?db=0")
        Producer(client, "s").send({"a": "1"})
        consumer = Consumer(client, "s", "g", max_wait_ms=100)  # its own reader connection
        batch = consumer.get_batch()
        assert [m.fields for m in batch] == [{"a": "1"}]
        consumer.ack_many(batch)
        consumer.close()
        client.close()


@pytest.mark.parametrize("option", ["fooo=1", "sentinel_password=sekret"])
def test_an_unknown_url_option_is_refused_at_once(option: str) -> None:
    # redis-py would hand it to the connection class, which fails at the first command.
    with pytest.raises(ConfigError, match="unknown option") as info:
        conveyor.connect(f"redis://localhost:6379/0?{option}")
    assert "sekret" not in str(info.value)


def test_spaces_around_a_url_are_ignored(redis_url: str) -> None:
    # A REDIS_URL read from a file often ends with a newline; a leading space is no TLS "s".
    client = conveyor.connect(f" {redis_url}\n")
    assert client.connection_pool.connection_class is redis.Connection
    assert client.ping() is True
    client.close()


@pytest.mark.parametrize("path", ["/abc", "/1.5", "/0/extra", "/-1"])
def test_a_db_that_is_not_a_number_is_refused(path: str) -> None:
    with pytest.raises(conveyor.ConfigError) as caught:
        conveyor.connect(f"redis://u:secret@127.0.0.1:6379{path}")
    assert "bad db" in str(caught.value) and "secret" not in str(caught.value)
