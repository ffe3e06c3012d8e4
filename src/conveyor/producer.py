"""Producer and AsyncProducer: single and pipelined sends with retention and an optional codec.

Sends are never retried automatically: a retried XADD whose first reply was lost appends the
entry twice. A failure raises ConnectionLost, saying how many entries of the call were confirmed.
Sends with idempotency keys can be repeated safely: a key seen within ``idempotency_window_ms``
adds nothing and answers the id of the entry first sent under it (one script per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._core import scripts
from conveyor._io import server_error
from conveyor._keys import idempotency_key
from conveyor.config import Codec, ProducerConfig
from conveyor.errors import ConfigError, ConnectionLost, FieldTypeError, PayloadError
from conveyor.models import PAYLOAD_FIELD, dump_payload

__all__ = ["AsyncProducer", "Producer"]


#: the kinds of replies of a round trip of XADDs that all succeeded
_BYTES, _STR = {bytes}, {str}


def check_idempotency_key(key: object, where: str = "") -> None:
    """Raise ConfigError unless ``key`` is a non-empty str."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"idempotency key{where} must be a non-empty str, got {key!r}")


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
        idempotency_window_ms: int = 86_400_000,
    ) -> None:
        self.config = ProducerConfig(
            stream=stream,
            maxlen=maxlen,
            minid=minid,
            approximate=approximate,
            codec=codec,
            chunk=chunk,
            max_message_bytes=max_message_bytes,
            idempotency_window_ms=idempotency_window_ms,
        )
        self.client = client
        #: entries this producer has added
        self.sent_count = 0
        #: sends under an idempotency key already seen, which added nothing
        self.repeated_count = 0

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

    def _chunks(
        self, rows: Iterable[Any], chunk: int | None, keys: Sequence[str] | None = None
    ) -> Iterator[list[cmd.Command]]:
        """The XADDs of ``rows``, ``chunk`` at a time; with idempotency ``keys``, one script
        per chunk instead."""
        size = self.config.chunk if chunk is None else chunk
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"chunk must be an int >= 1, got {size!r}")
        if keys is not None:
            rows = self._keyed_rows(rows, keys)
        it = iter(rows)
        index = 0
        while block := list(islice(it, size)):
            commands = []
            for row in block:
                commands.append(self._command(row, f" of row {index}"))
                index += 1
            if keys is None:
                yield commands
            else:
                yield [self._idempotent(commands, keys[index - len(block) : index])]

    @staticmethod
    def _keyed_rows(rows: Iterable[Any], keys: Sequence[str]) -> list[Any]:
        if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
            raise ConfigError(
                f"idempotency_keys must be a sequence of str, one per row, got "
                f"{type(keys).__name__}"
            )
        rows = list(rows)
        if len(keys) != len(rows):
            raise ConfigError(
                f"idempotency_keys has {len(keys)} keys for {len(rows)} rows: give one per row"
            )
        for index, key in enumerate(keys):
            check_idempotency_key(key, f" of row {index}")
        return rows

    def _idempotent(self, xadds: list[cmd.Command], keys: Sequence[str]) -> cmd.Command:
        """The XADDs of one chunk as one IDEMPOTENT_ADD script under ``keys``."""
        c = self.config
        options = 0 if c.maxlen is None and c.minid is None else 3
        args: list[Any] = [c.idempotency_window_ms, options, *xadds[0][2 : 2 + options]]
        for xadd in xadds:
            values = xadd[3 + options :]
            if len(values) > 2 * cmd.MAX_INLINE_FIELDS:
                raise PayloadError(
                    f"a message for stream {c.stream!r} has {len(values) // 2} fields; sends "
                    f"with an idempotency key take at most {cmd.MAX_INLINE_FIELDS:,}"
                )
            args.append(len(values))
            args.extend(values)
        names = [idempotency_key(c.stream, key) for key in keys]
        return ("EVAL", scripts.IDEMPOTENT_ADD, 1 + len(names), c.stream, *names, *args)

    def _first_ids(self, replies: list[Any], sent_before: int) -> list[str]:
        """The ids of one round trip's IDEMPOTENT_ADD scripts (first ids for repeated keys)."""
        ids: list[str] = []
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise server_error(
                    reply,
                    f"idempotent XADD to stream {self.stream!r} failed; "
                    f"{sent_before + len(ids)} entries of this call were added or found sent",
                )
            chunk_ids, fresh = reply
            added = sum(int(flag) for flag in fresh)
            self.sent_count += added
            self.repeated_count += len(fresh) - added
            ids.extend(cmd.parse_id(i) for i in chunk_ids)
        return ids

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

    def _lost(self, exc: ConnectionLost, confirmed: int, keyed: bool = False) -> ConnectionLost:
        if keyed:
            return ConnectionLost(
                f"{exc}; {confirmed} entries of this call were confirmed; sending again with the "
                "same idempotency keys adds none of them twice"
            )
        return ConnectionLost(
            f"{exc}; {confirmed} entries of this call were confirmed, the chunks in flight (up "
            "to two) may or may not have been added (not retried, to avoid duplicates)"
        )

    def _one(
        self, fields: Any, key: str | None
    ) -> tuple[cmd.Command, Callable[[list[Any], int], list[str]]]:
        """The command that sends one entry, and how to read its reply."""
        if key is None:
            return self._command(fields), self._ids
        check_idempotency_key(key)
        return self._idempotent([self._command(fields)], [key]), self._first_ids


class Producer(_ProducerBase):
    """Adds entries to one stream.

    >>> p = Producer(r, "orders", maxlen=1_000_000)   # doctest: +SKIP
    >>> p.send({"order_id": "42"})                     # doctest: +SKIP
    '1700000000000-0'
    """

    def send(
        self, fields: Mapping[str | bytes, Any] | Any, *, idempotency_key: str | None = None
    ) -> str:
        """Add one entry; returns its id. Values: str, bytes, int or float (any JSON value
        with ``codec="json"``).

        With ``idempotency_key``, a key already sent within ``idempotency_window_ms`` adds
        nothing and returns the id of the entry first sent under it: a send whose reply was
        lost can be repeated.
        """
        command, ids_of = self._one(fields, idempotency_key)
        return ids_of(_io.pool_roundtrip(self.client, [command]), 0)[0]

    def send_many(
        self,
        rows: Iterable[Any],
        chunk: int | None = None,
        *,
        idempotency_keys: Sequence[str] | None = None,
    ) -> list[str]:
        """Add many entries, ``chunk`` per pipeline, each chunk written before the replies of
        the one before are read (the server adds one chunk while this side packs the next);
        returns their ids in order.

        Each chunk is validated before it is sent: a bad row raises before its chunk goes out,
        and the error says how many entries were already added. ``idempotency_keys`` (one per
        row) makes the call safe to repeat, as ``send``'s ``idempotency_key``: one script per
        chunk adds the rows whose keys are new.
        """
        ids: list[str] = []
        ids_of = self._ids if idempotency_keys is None else self._first_ids
        try:
            for replies in _io.pipelined(self.client, self._chunks(rows, chunk, idempotency_keys)):
                ids.extend(ids_of(replies, len(ids)))
        except ConnectionLost as exc:
            raise self._lost(exc, len(ids), idempotency_keys is not None) from exc
        except (FieldTypeError, PayloadError) as exc:
            raise type(exc)(f"{exc} ({len(ids)} entries before it were added)") from None
        return ids


class AsyncProducer(_ProducerBase):
    """Producer for ``redis.asyncio`` clients, with the same parameters.

    >>> await AsyncProducer(ar, "orders").send({"order_id": "42"})  # doctest: +SKIP
    """

    async def send(
        self, fields: Mapping[str | bytes, Any] | Any, *, idempotency_key: str | None = None
    ) -> str:
        """See ``Producer.send``."""
        command, ids_of = self._one(fields, idempotency_key)
        return ids_of(await _io.apool_roundtrip(self.client, [command]), 0)[0]

    async def send_many(
        self,
        rows: Iterable[Any],
        chunk: int | None = None,
        *,
        idempotency_keys: Sequence[str] | None = None,
    ) -> list[str]:
        """See ``Producer.send_many``."""
        ids: list[str] = []
        ids_of = self._ids if idempotency_keys is None else self._first_ids
        chunks = self._chunks(rows, chunk, idempotency_keys)
        try:
            async for replies in _io.apipelined(self.client, chunks):
                ids.extend(ids_of(replies, len(ids)))
        except ConnectionLost as exc:
            raise self._lost(exc, len(ids), idempotency_keys is not None) from exc
        except (FieldTypeError, PayloadError) as exc:
            raise type(exc)(f"{exc} ({len(ids)} entries before it were added)") from None
        return ids
