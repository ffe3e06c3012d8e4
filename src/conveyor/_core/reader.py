"""The plain reader without I/O: where reading starts on each stream, which XREADs to send, what
their replies mean and what a commit writes. ``conveyor.reader`` carries the rounds.

A reader has no consumer group. Its position on a stream is the id of the last entry it
returned (reading continues after it); its checkpoint, ``_keys.reader_key(stream, name)``, a
plain string holding the id it last committed. Every step is a plan, as ``_io.Plan``: a
generator that yields a ``Round`` of commands, is sent their replies (error replies already
raised by the driver) and returns its result. State changes only once a round's replies are in,
so a round that fails changes nothing and is simply tried again.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from conveyor._core import commands as cmd
from conveyor._keys import key_slot, reader_key
from conveyor.config import check_encoding, check_int, check_name
from conveyor.errors import ConfigError, ServerError
from conveyor.models import Message

__all__ = [
    "TURN_BLOCK_MS",
    "ReaderConfig",
    "ReaderMachine",
    "Round",
    "parse_stream_id",
]

#: on a cluster, streams of several slots are waited for in turn, this long on each
TURN_BLOCK_MS = 100

_MAX_ID_PART = 2**64 - 1

_T = TypeVar("_T")


def parse_stream_id(text: str) -> str | None:
    """``text`` as a complete stream id (``ms-seq``), or None if it is not one.

    >>> parse_stream_id("0"), parse_stream_id("1700000000000-5"), parse_stream_id("5-")
    ('0-0', '1700000000000-5', None)
    >>> parse_stream_id("$"), parse_stream_id("18446744073709551616-0")
    (None, None)
    """
    ms, dash, seq = text.partition("-")
    if not dash:
        seq = "0"
    if not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    if int(ms) > _MAX_ID_PART or int(seq) > _MAX_ID_PART:
        return None
    return f"{int(ms)}-{int(seq)}"


@dataclass(frozen=True, kw_only=True, slots=True)
class ReaderConfig:
    """What a StreamReader or AsyncStreamReader was asked to do.

    >>> ReaderConfig(streams=("orders",), name="audit").start
    '$'
    """

    streams: tuple[str, ...]
    #: the checkpoint's name; None: positions kept in memory only
    name: str | None
    #: where a stream without a checkpoint starts: "$" (after its last entry), "0", or an id
    #: (reading begins after it)
    start: str = "$"
    batch_size: int = 100
    #: how long an empty batch waits on the server for entries
    max_wait_ms: int = 1000
    encoding: str | None = "utf-8"

    def __post_init__(self) -> None:
        if not self.streams:
            raise ConfigError("stream must name at least one stream")
        for s in self.streams:
            if isinstance(s, bytes):
                raise ConfigError(f"stream names must be str, not bytes: got {s!r}")
            check_name("stream", s)
        if len(set(self.streams)) != len(self.streams):
            raise ConfigError(f"stream lists a stream twice: {list(self.streams)}")
        if self.name is not None:
            check_name("name", self.name)
        if not isinstance(self.start, str) or (
            self.start != "$" and parse_stream_id(self.start) is None
        ):
            raise ConfigError(
                f"start must be '$', '0' or a stream id like '1700000000000-0', got {self.start!r}"
            )
        check_int("batch_size", self.batch_size, 1, 1_000_000)
        wait = self.max_wait_ms
        if isinstance(wait, int) and not isinstance(wait, bool) and wait < 1:
            raise ConfigError(
                f"max_wait_ms must be >= 1, got {wait}: the reader would spin on the server "
                "while nothing arrives; use a larger value"
            )
        check_int("max_wait_ms", self.max_wait_ms, 1, 86_400_000)
        if self.encoding is not None:
            check_encoding(self.encoding)


@dataclass(frozen=True, slots=True)
class Round:
    """The commands of one round trip, and what each is (named in an error reply's message)."""

    commands: tuple[cmd.Command, ...]
    whats: tuple[str, ...]
    #: XREADs: on the reader's own connections (they block); else a pooled connection
    reads: bool = False


#: a step of the reader: yields rounds, is sent their replies, returns its result
Plan = Generator[Round, list[Any], _T]


class ReaderMachine:
    """Positions and checkpoints of one reader, and the plans that move them."""

    def __init__(self, config: ReaderConfig, *, cluster: bool = False) -> None:
        self.config = config
        #: per stream: the id of the last entry returned (reading continues after it)
        self.position: dict[str, str] = {}
        #: per stream: the checkpoint as last loaded or saved
        self.committed: dict[str, str] = {}
        self.loaded = False
        #: streams that had no checkpoint at loading, and where they start (for the log)
        self.fresh: dict[str, str] = {}
        self._names: dict[Any, str] = {}
        for s in config.streams:
            self._names[s] = s
            self._names[s.encode("utf-8", "surrogateescape")] = s
        # What one XREAD may read together: on a cluster only the streams of one slot.
        groups: dict[int, list[str]] = {}
        for s in config.streams:
            groups.setdefault(key_slot(s) if cluster else 0, []).append(s)
        self.groups = [tuple(g) for g in groups.values()]

    @property
    def label(self) -> str:
        """How log lines and errors name this reader."""
        name = self.config.name
        return f"reader {name!r}" if name is not None else f"reader of {list(self.config.streams)}"

    def key(self, stream: str) -> str:
        assert self.config.name is not None
        return reader_key(stream, self.config.name)

    # -- plans -------------------------------------------------------------------------------

    def load(self) -> Plan[None]:
        """Load the checkpoints; a stream without one starts at ``start`` resolved to an id,
        saved at once (SET NX: a reader restarted before it ever commits skips nothing; a
        reader that lost the race takes the stored value). Notes them in ``fresh``."""
        c = self.config
        streams = c.streams
        if c.name is None:
            stored = {s: self.committed.get(s) for s in streams}
        else:
            replies = yield Round(
                tuple(("GET", self.key(s)) for s in streams),
                tuple(self._checkpoint_what(s) for s in streams),
            )
            stored = {s: self._checkpoint(s, r) for s, r in zip(streams, replies, strict=True)}
        missing = [s for s in streams if stored[s] is None]
        starts: dict[str, str] = {}
        if c.start == "$" and missing:
            replies = yield Round(
                tuple(("XREVRANGE", s, "+", "-", "COUNT", 1) for s in missing),
                tuple(f"{self.label}: reading the last entry of {s!r}" for s in missing),
            )
            for s, reply in zip(missing, replies, strict=True):
                starts[s] = cmd.as_text(reply[0][0]) if reply else "0-0"
        elif missing:
            resolved = parse_stream_id(c.start)
            assert resolved is not None
            starts = dict.fromkeys(missing, resolved)
        if c.name is not None and missing:
            commands: list[cmd.Command] = []
            for s in missing:
                commands += [("SET", self.key(s), starts[s], "NX"), ("GET", self.key(s))]
            replies = yield Round(
                tuple(commands), tuple(self._checkpoint_what(s) for s in missing for _ in range(2))
            )
            for i, s in enumerate(missing):
                stored[s] = self._checkpoint(s, replies[2 * i + 1]) or starts[s]
        else:
            stored.update(starts)
        self.position = {s: v for s, v in stored.items() if v is not None}
        self.committed = dict(self.position)
        self.loaded = True
        self.fresh = {s: self.position[s] for s in missing}

    def batch(self) -> Plan[list[Message]]:
        """Up to ``batch_size`` entries after the positions (loading first if need be).

        One XREAD for all streams where one server holds them all, or one slot. On a cluster
        with streams in several slots: each slot's streams are read without blocking; if that
        gave nothing, each slot in turn is waited on for ``TURN_BLOCK_MS`` (or what is left of
        ``max_wait_ms``) until something comes or ``max_wait_ms`` has passed.
        """
        if not self.loaded:
            yield from self.load()
        c = self.config
        if len(self.groups) == 1:
            replies = yield self._reads((self.groups[0],), c.max_wait_ms)
            return self._take(replies)
        replies = yield self._reads(self.groups, None)
        got = self._take(replies)
        waited = 0
        turn = 0
        while not got and waited < c.max_wait_ms:
            block_ms = min(TURN_BLOCK_MS, c.max_wait_ms - waited)
            replies = yield self._reads((self.groups[turn],), block_ms)
            got = self._take(replies)
            waited += block_ms
            turn = (turn + 1) % len(self.groups)
        return got

    def commit(self, position: Mapping[str, str] | None = None) -> Plan[None]:
        """Save ``position`` (default: the current one) as the checkpoint; only the streams
        whose checkpoint changes are written. Without a name only ``committed`` changes."""
        wanted = self._commit_target(position)
        changed = {s: i for s, i in wanted.items() if self.committed.get(s) != i}
        if changed and self.config.name is not None:
            yield Round(
                tuple(("SET", self.key(s), i) for s, i in changed.items()),
                tuple(self._checkpoint_what(s) for s in changed),
            )
        self.committed.update(changed)

    def rewind(self) -> None:
        """Back to the checkpoint: the entries after it are read again."""
        self.position.update(self.committed)

    # -- helpers -----------------------------------------------------------------------------

    def _reads(self, groups: Sequence[tuple[str, ...]], block_ms: int | None) -> Round:
        commands = []
        for streams in groups:
            head: cmd.Command = ("XREAD", "COUNT", self.config.batch_size)
            if block_ms is not None:
                head = (*head, "BLOCK", max(1, block_ms))
            commands.append((*head, "STREAMS", *streams, *(self.position[s] for s in streams)))
        whats = tuple(f"{self.label}: XREAD of {list(streams)}" for streams in groups)
        return Round(tuple(commands), whats, reads=True)

    def _take(self, replies: Sequence[Any]) -> list[Message]:
        """The messages of XREAD replies, oldest first, cut at ``batch_size`` (XREAD's COUNT
        is per stream); positions move past what is returned, never past what is cut."""
        messages: list[Message] = []
        for reply in replies:
            messages += cmd.parse_read(reply, self._names, self.config.encoding, 1).messages
        if len(self.config.streams) > 1:
            messages.sort(key=lambda m: cmd.id_order(m.id))  # stable: each stream keeps order
            del messages[self.config.batch_size :]
        for m in messages:
            self.position[m.stream] = m.id
        return messages

    def _checkpoint_what(self, stream: str) -> str:
        return f"{self.label}: checkpoint key {self.key(stream)!r}"

    def _checkpoint(self, stream: str, reply: Any) -> str | None:
        """A checkpoint as read by GET: its id, None if there is none; ServerError if the key
        holds something else (written by someone else)."""
        if reply is None:
            return None
        text = cmd.as_text(reply)
        found = parse_stream_id(text)
        if found is None:
            shown = text if len(text) <= 60 else text[:60] + "..."
            raise ServerError(
                f"{self._checkpoint_what(stream)} holds {shown!r}, not a stream id; "
                "delete the key or use another reader name"
            )
        return found

    def _commit_target(self, position: Mapping[str, str] | None) -> dict[str, str]:
        if position is None:
            return dict(self.position)
        if not isinstance(position, Mapping):
            raise ConfigError(
                f"position must map stream names to ids, got {type(position).__name__}"
            )
        wanted = {}
        for s, entry_id in position.items():
            if s not in self._names or not isinstance(s, str):
                raise ConfigError(f"position names stream {s!r}, which {self.label} does not read")
            found = parse_stream_id(entry_id) if isinstance(entry_id, str) else None
            if found is None:
                raise ConfigError(
                    f"position of {s!r} must be a stream id like '1700000000000-0', "
                    f"got {entry_id!r}"
                )
            wanted[s] = found
        return wanted
