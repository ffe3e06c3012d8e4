"""The sans-IO promise, the public names, and configuration errors."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot as redis_key_slot

import conveyor
from conveyor import ConfigError
from conveyor._keys import dead_letter_key, heartbeat_key, key_slot
from conveyor.config import ConsumerConfig, ProducerConfig
from conveyor.connection import redact_url
from conveyor.consumer import default_consumer_name

SRC = Path(conveyor.__file__).parent
FORBIDDEN = {"redis", "asyncio", "time", "socket", "threading", "hiredis"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_core_imports_no_io_at_all() -> None:
    """_core and every conveyor module it pulls in import neither redis nor asyncio nor time."""
    todo = list((SRC / "_core").glob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
            if name.startswith("conveyor."):
                target = SRC.joinpath(*name.split(".")[1:])
                todo.append(
                    target / "__init__.py" if target.is_dir() else target.with_suffix(".py")
                )
    assert len(seen) > 4


def test_public_names() -> None:
    for name in conveyor.__all__:
        assert hasattr(conveyor, name), name
    for name in ("Producer", "Consumer", "AsyncConsumer", "connect", "Message", "Batch"):
        assert name in conveyor.__all__


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": "10"}, "batch_size must be an int"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"group": ""}, "group"),
        ({"streams": ()}, "at least one stream"),
        ({"streams": ("a", "a")}, "twice"),
        ({"start": "yesterday"}, "start"),
        ({"encoding": "klingon"}, "encoding"),
        ({"max_deliveries": 0}, "max_deliveries"),
    ],
)
def test_consumer_config_errors_name_the_argument(kw: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"streams": ("s",), "group": "g", "consumer": "c"}
    args.update(kw)
    with pytest.raises(ConfigError, match=needle):
        ConsumerConfig(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"maxlen": -1}, "maxlen"),
        ({"minid": "abc"}, "minid"),
        ({"maxlen": 5, "minid": "1-0"}, "not both"),
        ({"codec": "pickle"}, "codec"),
        ({"stream": ""}, "stream"),
    ],
)
def test_producer_config_errors(kw: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"stream": "s"}
    args.update(kw)
    with pytest.raises(ConfigError, match=needle):
        ProducerConfig(**args)  # type: ignore[arg-type]


def test_default_consumer_names_are_unique() -> None:
    names = {default_consumer_name() for _ in range(200)}
    assert len(names) == 200


def test_derived_keys_share_the_hash_slot() -> None:
    assert dead_letter_key("orders") == "{orders}:dead"
    assert dead_letter_key("{shop}orders") == "{shop}orders:dead"


@given(st.text(alphabet="{}ab:é", max_size=10), st.text(alphabet="{}g", max_size=4))
def test_derived_keys_follow_the_hash_tag_rule_exactly(stream: str, group: str) -> None:
    # redis-py's key_slot is the reference; an empty {} is no tag (the whole name is hashed)
    want = redis_key_slot(stream.encode())
    assert key_slot(stream) == want
    assert redis_key_slot(dead_letter_key(stream).encode()) == want
    assert redis_key_slot(heartbeat_key(stream, group).encode()) == want


def test_an_empty_tag_is_no_tag() -> None:
    assert key_slot("{}orders") != key_slot("{}")
    assert dead_letter_key("{}orders").endswith("{}orders:dead")


def test_redact_url_hides_the_password() -> None:
    assert "sekret" not in redact_url("rediss://u:sekret@h:6380/1")
    assert redact_url("redis://h:6379") == "redis://h:6379"


def test_the_dead_letter_script_writes_exactly_the_provenance_fields() -> None:
    from conveyor._core.scripts import DEAD_LETTER
    from conveyor.models import PROVENANCE_FIELDS

    written = re.findall(r"'(conveyor\.[a-z_]+)'", DEAD_LETTER)
    assert tuple(written) == PROVENANCE_FIELDS
