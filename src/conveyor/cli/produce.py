"""``conveyor produce``: add messages to a stream from arguments or from JSON lines on stdin."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from conveyor import Producer
from conveyor.cli import EXIT_INTERRUPTED, CliError, _sigterm_as_interrupt, main, redis_options
from conveyor.cli._common import (
    client_for,
    echo_json,
    json_option,
    quiet_broken_pipe,
    stream_option,
)
from conveyor.models import non_finite

#: lines sent per pipelined round trip when reading stdin
_CHUNK = 500


class _BadLine(Exception):
    """A stdin line that cannot become a stream entry: sent lines before it stay sent."""


def parse_pair(text: str) -> tuple[str, str]:
    """``FIELD=VALUE`` as a pair; the value may itself contain ``=``.

    >>> parse_pair("order_id=42"), parse_pair("q=a=b")
    (('order_id', '42'), ('q', 'a=b'))
    """
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise CliError(f"argument {text!r} is not FIELD=VALUE")
    return field, value


def parse_line(line: str, number: int, *, whole: bool) -> Any:
    """One stdin line as what ``Producer.send`` takes: the fields of a flat JSON object, or
    (``whole``) any JSON value, sent as the payload of the json codec."""
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise _BadLine(f"line {number} is not JSON: {exc}") from None
    if whole:
        found = non_finite(value)
        if found is not None:
            where, bad = found
            raise _BadLine(f"line {number}: {_no_such_number(f'payload{where}', bad)}")
        return value
    if not isinstance(value, dict):
        raise _BadLine(
            f"line {number} is a JSON {_kind(value)}, not an object; "
            "use --json-payload to send any JSON value"
        )
    if not value:
        raise _BadLine(f"line {number} is an empty object: a stream entry needs a field")
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise _BadLine(
                f"line {number}: field {key!r} is a JSON {_kind(item)}; values must be strings "
                "or numbers (use --json-payload to send each line whole as JSON)"
            )
        if isinstance(item, float) and not math.isfinite(item):
            raise _BadLine(f"line {number}: {_no_such_number(f'field {key!r}', item)}")
    return value


def _no_such_number(what: str, value: float) -> str:
    """Python reads NaN, Infinity and 1e999 from JSON text; JSON has no such numbers."""
    return f"{what} is {value}, which is not a JSON number (NaN and Infinity are refused)"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else "number"


def _read_rows(lines: Iterable[str], whole: bool) -> Iterator[list[Any]]:
    """Blocks of up to ``_CHUNK`` parsed lines; a bad line ends the blocks with the rows
    before it, then raises."""
    block: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            block.append(parse_line(line, number, whole=whole))
        except _BadLine:
            if block:
                yield block
            raise
        if len(block) >= _CHUNK:
            yield block
            block = []
    if block:
        yield block


@main.command()
@stream_option
@click.argument("pairs", metavar="[FIELD=VALUE]...", nargs=-1)
@click.option(
    "--maxlen",
    metavar="N",
    type=click.IntRange(min=0),
    help="Keep the stream at about N entries (XADD MAXLEN ~ N): older ones are trimmed.",
)
@click.option(
    "--json-payload",
    is_flag=True,
    help="Send each stdin line whole, as JSON in the 'payload' field (read it back with "
    "msg.payload), instead of the fields of a flat object.",
)
@click.option("-q", "--quiet", is_flag=True, help="Print how many were added, not their ids.")
@json_option
@redis_options()
def produce(
    stream: str,
    pairs: tuple[str, ...],
    maxlen: int | None,
    json_payload: bool,
    quiet: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Add messages to a stream and print their ids, one a line (--json: {"stream", "id"}
    per line; with --quiet, {"stream", "added"}).

    With FIELD=VALUE arguments, one message with those fields. Without them, one message per
    line of stdin, each line a JSON object whose values are strings or numbers (nested values
    are an error naming the line; --json-payload sends each line whole instead). NaN and
    Infinity, which JSON does not have, are refused. Blank lines are skipped. A bad line
    stops the command: the lines before it were added, none after.

    \b
    Examples:
      conveyor produce --stream orders order_id=42 amount=9.5
      printf '{"order_id": 1}\\n{"order_id": 2}\\n' | conveyor produce -s orders --quiet
      conveyor produce -s events --json-payload --maxlen 1000000 < events.jsonl
    """
    if pairs:
        fields = dict(parse_pair(pair) for pair in pairs)
        with client_for(url) as client:
            producer = Producer(client, stream, maxlen=maxlen, codec=_codec(json_payload))
            msg_id = producer.send(fields)
        with quiet_broken_pipe():
            _report([msg_id], stream, quiet=quiet, as_json=as_json)
            if quiet:
                _added(1, stream, as_json=as_json)
        return
    if sys.stdin.isatty():
        click.echo("reading JSON lines from stdin; Ctrl-D to end, Ctrl-C to stop", err=True)
    with client_for(url) as client:
        producer = Producer(client, stream, maxlen=maxlen, codec=_codec(json_payload))
        sent = _produce_lines(producer, sys.stdin, whole=json_payload, quiet=quiet, as_json=as_json)
    if quiet:
        with quiet_broken_pipe():
            _added(sent, stream, as_json=as_json)


def _codec(json_payload: bool) -> Any:
    return "json" if json_payload else None


def _report(ids: list[str], stream: str, *, quiet: bool, as_json: bool) -> None:
    """The ids of entries just added, one a line (unless --quiet)."""
    if quiet or not ids:
        return
    if as_json:
        click.echo("\n".join(json.dumps({"stream": stream, "id": i}) for i in ids))
    else:
        click.echo("\n".join(ids))


def _added(count: int, stream: str, *, as_json: bool) -> None:
    if as_json:
        echo_json({"stream": stream, "added": count})
    else:
        click.echo(str(count))


def _produce_lines(
    producer: Producer, lines: TextIO, *, whole: bool, quiet: bool, as_json: bool
) -> int:
    """Send the lines in pipelined blocks under a progress display on stderr; returns how many
    entries were added."""
    console = Console(stderr=True, highlight=False)
    columns = (SpinnerColumn(), TextColumn("{task.description} {task.completed:,} sent"))
    sent = 0
    # Ids go to stdout; only when that is the terminal too do they print above the display.
    to_terminal = sys.stdout.isatty()
    progress = Progress(
        *columns,
        TimeElapsedColumn(),
        console=console,
        transient=True,
        redirect_stdout=to_terminal,
        redirect_stderr=False,
        disable=not console.is_terminal,
    )
    with (
        progress as bar,
        _sigterm_as_interrupt(),
        quiet_broken_pipe(),
    ):
        task = bar.add_task(producer.stream, total=None)
        try:
            for block in _read_rows(lines, whole):
                ids = producer.send_many(block)
                sent += len(ids)
                bar.update(task, completed=sent)
                _report(ids, producer.stream, quiet=quiet, as_json=as_json)
        except _BadLine as exc:
            raise CliError(f"{exc} (entries added before it: {sent})") from None
        except KeyboardInterrupt:
            bar.stop()
            click.echo(
                f"interrupted: {sent} entries added (and perhaps the block in flight)", err=True
            )
            raise SystemExit(EXIT_INTERRUPTED) from None
    return sent
