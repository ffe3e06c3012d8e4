"""Producer and AsyncProducer: single and pipelined sends with retention and an optional codec.

Sends are never retried automatically: a retried XADD whose first reply was lost appends the
entry twice. A failure raises ConnectionLost, saying how many entries of the call were confirmed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._io import server_error
from conveyor.config import Codec, ProducerConfig
from conveyor.errors import ConfigError, ConnectionLost, FieldTypeError, PayloadError
from conveyor.models import PAYLOAD_FIELD, dump_payload

__all__ = ["AsyncProducer", "Producer"]


#: the kinds of replies of a round trip of XADDs that all succeeded
_BYTES, _STR = {bytes}, {str}


class _ProducerBase:
    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        maxlen: int | None = None,
        minid: str | None = None,
        approximate: bool = True,
        codec: Codec | None = None,
        chunk: int = 500,
        max_message_bytes: int | None = None,
    ) -> None:
        self.config = ProducerConfig(
            stream=stream,
            maxlen=maxlen,
            minid=minid,
            approximate=approximate,
            codec=codec,
            chunk=chunk,
            max_message_bytes=max_message_bytes,
        )
        self.client = client
        #: entries this producer has added
        self.sent_count = 0

    @property
    def stream(self) -> str:
        return self.config.stream

    def __repr__(self) -> str:
        return f"<{type(self).__name__} stream={self.stream!r} sent={self.sent_count}>"

    def _command(self, fields: Any, where: str = "") -> cmd.Command:
        c = self.config
        if c.codec == "json":
            try:
                fields = {PAYLOAD_FIELD: dump_payload(fields)}
            except (TypeError, ValueError) as exc:
                raise FieldTypeError(f"payload{where} is not JSON-serializable: {exc}") from None
        else:
            cmd.validate_fields(fields, where)
        if c.max_message_bytes is not None:
            size = cmd.fields_bytes(fields)
            if size > c.max_message_bytes:
                raise PayloadError(
                    f"message{where} for stream {c.stream!r} is {size} bytes of fields, over "
                    f"max_message_bytes={c.max_message_bytes}; nothing of it was sent"
                )
        return cmd.xadd(c.stream, fields, c.maxlen, c.minid, c.approximate)

    def _chunks(self, rows: Iterable[Any], chunk: int | None) -> Iterator[list[cmd.Command]]:
        size = self.config.chunk if chunk is None else chunk
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"chunk must be an int >= 1, got {size!r}")
        it = iter(rows)
        index = 0
        while block := list(islice(it, size)):
            commands = []
            for row in block:
                commands.append(self._command(row, f" of row {index}"))
                index += 1
            yield commands

    def _ids(self, replies: list[Any], sent_before: int) -> list[str]:
        """The ids of one round trip's XADDs; a refused one raises, saying how many entries of
        this call were added (every reply counted, the ones after the refusal too)."""
        kinds = set(map(type, replies))
        if kinds == _BYTES:  # the hot path: every XADD answered, ids converted in one go
            converted = b" ".join(replies).decode().split(" ")
            self.sent_count += len(converted)
            return converted
        if kinds == _STR:
            self.sent_count += len(replies)
            return list(replies)
        ids: list[str] = []
        refused = None
        for reply in replies:
            if isinstance(reply, ResponseError):
                refused = refused or reply
            else:
                ids.append(cmd.parse_id(reply))
        self.sent_count += len(ids)
        if refused is not None:
            raise server_error(
                refused,
                f"XADD to stream {self.stream!r} failed; {sent_before + len(ids)} entries of "
                "this call were added",
            )
        return ids

    def _lost(self, exc: ConnectionLost, confirmed: int) -> ConnectionLost:
        return ConnectionLost(
            f"{exc}; {confirmed} entries of this call were confirmed, the chunks in flight (up "
            "to two) may or may not have been added (not retried, to avoid duplicates)"
        )


class Producer(_ProducerBase):
    """Adds entries to one stream.

    >>> p = Producer(r, "orders", maxlen=1_000_000)   # doctest: +SKIP
    >>> p.send({"order_id": "42"})                     # doctest: +SKIP
    '1700000000000-0'
    """

    def send(self, fields: Mapping[str | bytes, Any] | Any) -> str:
        """Add one entry; returns its id. Values: str, bytes, int or float (any JSON value
        with ``codec="json"``)."""
        return self._ids(_io.pool_roundtrip(self.client, [self._command(fields)]), 0)[0]

    def send_many(self, rows: Iterable[Any], chunk: int | None = None) -> list[str]:
        """Add many entries, ``chunk`` per pipeline, each chunk written before the replies of
        the one before are read (the server adds one chunk while this side packs the next);
        returns their ids in order.

        Each chunk is validated before it is sent: a bad row raises before its chunk goes out,
        and the error says how many entries were already added.
        """
        ids: list[str] = []
        try:
            for replies in _io.pipelined(self.client, self._chunks(rows, chunk)):
                ids.extend(self._ids(replies, len(ids)))
        except ConnectionLost as exc:
            raise self._lost(exc, len(ids)) from exc
        except (FieldTypeError, PayloadError) as exc:
            raise type(exc)(f"{exc} ({len(ids)} entries before it were added)") from None
        return ids


class AsyncProducer(_ProducerBase):
    """Producer for ``redis.asyncio`` clients, with the same parameters.

    >>> await AsyncProducer(ar, "orders").send({"order_id": "42"})  # doctest: +SKIP
    """

    async def send(self, fields: Mapping[str | bytes, Any] | Any) -> str:
        """See ``Producer.send``."""
        replies = await _io.apool_roundtrip(self.client, [self._command(fields)])
        return self._ids(replies, 0)[0]

    async def send_many(self, rows: Iterable[Any], chunk: int | None = None) -> list[str]:
        """See ``Producer.send_many``."""
        ids: list[str] = []
        try:
            async for replies in _io.apipelined(self.client, self._chunks(rows, chunk)):
                ids.extend(self._ids(replies, len(ids)))
        except ConnectionLost as exc:
            raise self._lost(exc, len(ids)) from exc
        except (FieldTypeError, PayloadError) as exc:
            raise type(exc)(f"{exc} ({len(ids)} entries before it were added)") from None
        return ids
