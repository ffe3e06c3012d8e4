"""connect(): safe defaults, TLS options, and no password in any repr, log or error."""

from __future__ import annotations

import logging
import os
import re
import ssl
from pathlib import Path

import pytest
import redis
import redis.asyncio

import conveyor
from conveyor import ConfigError, ConnectionLost, Consumer, EmbeddedServer, Producer
from conveyor.server import free_port
from tests.tls import TlsFiles, make_certificates


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


def test_tls_options_are_passed_through(certs: TlsFiles) -> None:
    client = conveyor.connect(
        "rediss://localhost:6380/0",
        ssl_ca_certs=str(certs.ca),
        ssl_certfile=str(certs.client_cert),
        ssl_keyfile=str(certs.client_key),
    )
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(certs.ca)
    assert kwargs["ssl_certfile"] == str(certs.client_cert)
    assert issubclass(client.connection_pool.connection_class, redis.SSLConnection)


# -- connect()'s TLS keywords (the TLS server's tests: tests/test_tls.py) ----------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("asyncio", [False, True])
def test_tls_keywords_are_redis_py_ssl_options(certs: TlsFiles, asyncio: bool) -> None:
    client = conveyor.connect(
        "rediss://localhost:6380/0",
        asyncio=asyncio,
        tls_ca=certs.ca,  # a Path will do
        tls_cert=str(certs.client_cert),
        tls_key=str(certs.client_key),
    )
    pool = client.connection_pool
    assert pool.connection_kwargs["ssl_ca_certs"] == str(certs.ca)
    assert pool.connection_kwargs["ssl_certfile"] == str(certs.client_cert)
    assert pool.connection_kwargs["ssl_keyfile"] == str(certs.client_key)
    ssl_class = redis.asyncio.SSLConnection if asyncio else redis.SSLConnection
    assert issubclass(pool.connection_class, ssl_class)
    assert pool.connection_kwargs.get("ssl_cert_reqs", "required") == "required"


@pytest.mark.parametrize(
    ("keyword", "option"),
    [("tls_ca", "ssl_ca_certs"), ("tls_cert", "ssl_certfile"), ("tls_key", "ssl_keyfile")],
)
def test_both_spellings_of_one_setting_are_refused(
    certs: TlsFiles, keyword: str, option: str
) -> None:
    path = str(certs.client_cert if keyword == "tls_cert" else certs.ca)
    with pytest.raises(ConfigError) as caught:
        conveyor.connect("rediss://localhost:6380/0", **{keyword: path, option: path})
    message = str(caught.value)
    assert keyword in message and option in message and "\n" not in message


def test_tls_insecure_and_ssl_cert_reqs_are_one_setting() -> None:
    with pytest.raises(ConfigError, match="tls_insecure and ssl_cert_reqs"):
        conveyor.connect("rediss://localhost:6380/0", tls_insecure=True, ssl_cert_reqs="none")


@pytest.mark.parametrize("keyword", ["tls_ca", "tls_cert", "tls_key", "tls_insecure"])
@pytest.mark.parametrize("url", ["redis://u:sekret@localhost:6379/0", "unix:///tmp/r.sock"])
def test_tls_keywords_need_a_tls_url(certs: TlsFiles, keyword: str, url: str) -> None:
    value: object = True if keyword == "tls_insecure" else str(certs.client_cert)
    with pytest.raises(ConfigError, match="need a rediss:// URL") as caught:
        conveyor.connect(url, **{keyword: value})
    assert keyword in str(caught.value) and "sekret" not in str(caught.value)


def test_tls_keywords_work_with_every_tls_scheme(certs: TlsFiles) -> None:
    for url in ("valkeys://localhost:6380", "rediss+sentinel://localhost:26379/mymaster"):
        client = conveyor.connect(url, tls_ca=certs.ca)
        client.close()


@pytest.mark.parametrize("keyword", ["tls_ca", "tls_cert", "ssl_ca_certs"])
def test_a_missing_tls_file_is_one_line_naming_option_and_path(
    tmp_path: Path, keyword: str
) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(ConfigError) as caught:
        conveyor.connect("rediss://localhost:6380/0", **{keyword: str(missing)})
    assert str(caught.value) == f"{keyword} file {missing} does not exist"


def test_a_missing_tls_file_in_the_url_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigError, match=re.escape(f"ssl_ca_certs file {missing} does not exist")):
        conveyor.connect(f"rediss://localhost:6380/0?ssl_ca_certs={missing}")


def test_an_unreadable_tls_file_is_named(certs: TlsFiles) -> None:
    # a path through a file: unreadable for root too, where chmod 0 would not be
    unreadable = certs.client_key / "key.pem"
    with pytest.raises(ConfigError, match=re.escape(f"tls_key file {unreadable} cannot be read")):
        conveyor.connect("rediss://h:6380", tls_cert=certs.client_cert, tls_key=unreadable)


def test_a_directory_is_not_a_tls_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"tls_ca {tmp_path} is a directory")):
        conveyor.connect("rediss://localhost:6380/0", tls_ca=tmp_path)


def test_tls_files_that_hold_the_wrong_thing_are_named(certs: TlsFiles) -> None:
    with pytest.raises(ConfigError, match=r"tls_ca file .* holds no CA certificate"):
        conveyor.connect("rediss://h:6380", tls_ca=certs.client_key)
    with pytest.raises(ConfigError, match=r"tls_cert .* and tls_key .*: not a certificate"):
        conveyor.connect("rediss://h:6380", tls_cert=certs.client_cert, tls_key=certs.server_key)
    with pytest.raises(ConfigError, match="tls_key needs tls_cert"):
        conveyor.connect("rediss://h:6380", tls_key=certs.client_key)


@pytest.mark.parametrize(
    ("how", "options"),
    [
        ("tls_insecure", {"tls_insecure": True}),
        ("ssl_cert_reqs=none", {"ssl_cert_reqs": "none"}),
        ("ssl_cert_reqs=none", {"ssl_cert_reqs": None}),
        ("ssl_cert_reqs=none", {"ssl_cert_reqs": ssl.CERT_NONE}),
    ],
)
def test_unverified_tls_by_keyword_is_warned_about_each_time(
    caplog: pytest.LogCaptureFixture, how: str, options: dict[str, object]
) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        for _ in range(2):
            conveyor.connect("rediss://u:sekret@localhost:6380/0", **options).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all("verification is OFF" in w and how in w for w in warnings)
    assert "sekret" not in caplog.text


def test_verified_tls_logs_no_warning(caplog: pytest.LogCaptureFixture, certs: TlsFiles) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        conveyor.connect("rediss://localhost:6380/0", tls_ca=certs.ca).close()
        conveyor.connect("rediss://localhost:6380/0", ssl_cert_reqs="required").close()
    assert caplog.records == []


def test_an_unchecked_host_name_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        conveyor.connect("rediss://localhost:6380/0", ssl_check_hostname=False).close()
        conveyor.connect("rediss://localhost:6380/0?ssl_check_hostname=false").close()
    assert caplog.text.count("host name checking is OFF") == 2


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


def test_an_embedded_server_whose_port_was_taken_starts_on_another() -> None:
    """Another program took the port chosen for an EmbeddedServer before it started (a test
    run beside this one, say): it answers on a port of its own, never through the other."""
    binary = os.environ.get("CONVEYOR_TEST_SERVER") or None
    mine = EmbeddedServer(binary)
    chosen = mine.port
    with EmbeddedServer(binary, port=chosen) as squatter, mine:
        assert mine.port != chosen
        client = conveyor.connect(mine.url)
        assert client.info("server")["process_id"] == mine.pid != squatter.pid
        client.close()
        port = mine.port
        mine.kill()
        mine.start()  # a restart comes back on the same port
        assert mine.port == port


def test_an_embedded_server_with_a_password_starts_and_keeps_its_secret() -> None:
    binary = os.environ.get("CONVEYOR_TEST_SERVER") or None
    with EmbeddedServer(binary, extra_args=("--requirepass", "s3 cr/et")) as srv:
        client = conveyor.connect(srv.url.replace("redis://", "redis://:s3%20cr%2Fet@", 1))
        assert client.info("server")["process_id"] == srv.pid
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=srv.port).ping()
