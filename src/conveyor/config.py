"""Validated, frozen settings of producers and consumers.

Every duration carries its unit in its name. Validation happens once, on creation, and the error
names the argument, the value given and the accepted range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from conveyor._keys import dead_letter_key
from conveyor.errors import ConfigError

__all__ = [
    "ConsumerConfig",
    "ProducerConfig",
    "check_encoding",
    "check_int",
    "check_name",
    "is_stream_id",
]

Codec = Literal["json"]
_CODECS = ("json",)


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{name} must be >= {low}{upper}, got {value}")


def check_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty str, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsumerConfig:
    """What a Consumer or AsyncConsumer was asked to do.

    >>> ConsumerConfig(streams=("orders",), group="billing", consumer="w1").batch_size
    100
    """

    streams: tuple[str, ...]
    group: str
    consumer: str
    batch_size: int = 100
    #: how long a batch waits on the server for entries (an idle consumer blocks this long)
    max_wait_ms: int = 1000
    #: once a batch has messages, how much longer it waits to fill; None: until max_wait_ms
    linger_ms: int | None = None
    start: str = "0"
    encoding: str | None = "utf-8"
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    dead_letter: str | None = None
    #: how often a consumer says it is alive and renews its in-flight entries; None: derived
    heartbeat_ms: int | None = None
    #: the first retry of a failed message waits this long, doubling per delivery up to the max
    retry_backoff_ms: int = 1_000
    retry_backoff_max_ms: int = 60_000
    #: a handler still running after this long gives its batch up to the others; None: no limit
    handler_timeout_ms: int | None = None
    #: read with XREADGROUP NOACK: at-most-once, nothing pending, no heartbeats or reclaim
    noack: bool = False
    #: entries larger than this (field names and values, in bytes) are dead-lettered unseen
    max_message_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.streams:
            raise ConfigError("stream must name at least one stream")
        for s in self.streams:
            check_name("stream", s)
        if len(set(self.streams)) != len(self.streams):
            raise ConfigError(f"stream lists a stream twice: {list(self.streams)}")
        check_name("group", self.group)
        check_name("consumer", self.consumer)
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        if self.max_wait_ms == 0 and not isinstance(self.max_wait_ms, bool):
            raise ConfigError(
                "max_wait_ms must be at least 1: 0 would poll the server in a busy loop. It is "
                "how long an empty batch waits on the server; for low latency pass linger_ms=0 "
                "(a batch returns as soon as anything arrives)"
            )
        check_int("max_wait_ms", self.max_wait_ms, 1, 86_400_000)
        if self.linger_ms is not None:
            check_int("linger_ms", self.linger_ms, 0, 86_400_000)
        check_int("claim_idle_ms", self.claim_idle_ms, 20)
        check_int("max_deliveries", self.max_deliveries, 1)
        if not isinstance(self.start, str) or not (self.start == "$" or is_stream_id(self.start)):
            raise ConfigError(
                f"start must be '0', '$' or a stream id like '1700000000000-0', got {self.start!r}"
            )
        if self.encoding is not None:
            check_encoding(self.encoding)
        if self.dead_letter is not None:
            check_name("dead_letter", self.dead_letter)
            if self.dead_letter in self.streams:
                raise ConfigError(f"dead_letter {self.dead_letter!r} is one of the streams read")
        if self.heartbeat_ms is None:
            object.__setattr__(self, "heartbeat_ms", max(10, min(5_000, self.claim_idle_ms // 3)))
        check_int("heartbeat_ms", self.heartbeat_ms, 10)
        assert self.heartbeat_ms is not None
        if self.heartbeat_ms * 2 > self.claim_idle_ms:
            raise ConfigError(
                f"heartbeat_ms ({self.heartbeat_ms}) must be at most half of claim_idle_ms "
                f"({self.claim_idle_ms}), or live consumers' entries look idle and are taken"
            )
        check_int("retry_backoff_ms", self.retry_backoff_ms, 0)
        check_int("retry_backoff_max_ms", self.retry_backoff_max_ms, self.retry_backoff_ms)
        if self.handler_timeout_ms is not None:
            check_int("handler_timeout_ms", self.handler_timeout_ms, 1)
        if self.max_message_bytes is not None:
            check_int("max_message_bytes", self.max_message_bytes, 1)
        if not isinstance(self.noack, bool):
            raise ConfigError(f"noack must be True or False, got {self.noack!r}")
        if self.noack and self.handler_timeout_ms is not None:
            raise ConfigError(
                "handler_timeout_ms does not go with noack=True: entries read with NOACK are "
                "nobody's pending entries, so there is nothing to give up to the other consumers"
            )

    @property
    def heartbeat_interval_ms(self) -> int:
        """``heartbeat_ms`` resolved (never None after creation)."""
        assert self.heartbeat_ms is not None
        return self.heartbeat_ms

    def dead_letter_for(self, stream: str) -> str:
        """Where messages of ``stream`` go when given up on."""
        return self.dead_letter if self.dead_letter is not None else dead_letter_key(stream)


@dataclass(frozen=True, kw_only=True, slots=True)
class ProducerConfig:
    """What a Producer was asked to do: the stream, retention and payload codec.

    >>> ProducerConfig(stream="orders", maxlen=1000).approximate
    True
    """

    stream: str
    maxlen: int | None = None
    minid: str | None = None
    approximate: bool = True
    codec: Codec | None = None
    chunk: int = 500
    #: a message larger than this (field names and values, in bytes) is refused unsent
    max_message_bytes: int | None = None
    #: how long an idempotency key is remembered: a send under a key seen this recently adds
    #: nothing (default 24 hours)
    idempotency_window_ms: int = 86_400_000

    def __post_init__(self) -> None:
        check_name("stream", self.stream)
        if self.max_message_bytes is not None:
            check_int("max_message_bytes", self.max_message_bytes, 1)
        check_int("idempotency_window_ms", self.idempotency_window_ms, 1)
        if self.maxlen is not None:
            check_int("maxlen", self.maxlen, 0)
        if self.minid is not None and not (
            isinstance(self.minid, str) and is_stream_id(self.minid)
        ):
            raise ConfigError(
                f"minid must be a stream id like '1700000000000-0', got {self.minid!r}"
            )
        if self.maxlen is not None and self.minid is not None:
            raise ConfigError("give maxlen or minid, not both")
        if self.codec is not None and self.codec not in _CODECS:
            raise ConfigError(f"codec must be one of {_CODECS} or None, got {self.codec!r}")
        check_int("chunk", self.chunk, 1, 100_000)


#: the largest number a part of a stream id holds (Redis reads them as unsigned 64-bit)
_MAX_ID_PART = 2**64 - 1


def is_stream_id(text: str) -> bool:
    """Whether Redis takes ``text`` as a stream id: ``ms`` or ``ms-seq``, ASCII digits, each
    part at most 2**64 - 1.

    >>> is_stream_id("1700000000000-5"), is_stream_id("7"), is_stream_id("5-"), is_stream_id("²")
    (True, True, False, False)
    """
    ms, dash, seq = text.partition("-")
    parts = (ms, seq) if dash else (ms,)
    # str.isdigit() accepts "²" and other digits Redis refuses
    return all(p.isascii() and p.isdigit() and int(p) <= _MAX_ID_PART for p in parts)


#: bytes an encoding must decode and give back as they were: every byte value, a byte order
#: mark not at the start ("utf-8-sig" adds one there), an escape ("raw_unicode_escape" reads
#: it) and an odd length (UTF-16 cannot decode one)
_ENCODING_PROBE = bytes(range(256)) + b"\xef\xbb\xbf\\u0041x"


def check_encoding(encoding: str) -> None:
    """Refuse an encoding that cannot carry any field value: values are bytes, and with
    ``surrogateescape`` the undecodable ones must come back as the bytes they were."""
    import codecs

    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ConfigError(f"encoding {encoding!r} is not a known text encoding") from None
    try:
        text = _ENCODING_PROBE.decode(info.name, "surrogateescape")
        same = text.encode(info.name, "surrogateescape") == _ENCODING_PROBE
    except (LookupError, UnicodeError):
        same = False
    if not same:
        raise ConfigError(
            f"encoding {encoding!r} cannot carry arbitrary bytes as text and back (a text "
            "encoding such as 'utf-8' or 'latin-1' can; encoding=None gives bytes)"
        )
