"""Tracing with OpenTelemetry (conveyor.contrib.otel) against a real server, once per driver:
the spans land in the SDK's in-memory exporter, and the producer's trace is continued by the
consumer through the message's ``traceparent`` field."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor import Batch, Message
from conveyor.contrib.otel import TRACEPARENT, Tracing
from conveyor.errors import ConfigError
from tests.conftest import Drivers
from tests.test_recovery import pending

Name = Callable[[str], str]


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(spans: InMemorySpanExporter) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return Tracing(tracer_provider=provider)


def named(spans: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def test_the_consumer_continues_the_producer_s_trace(
    drivers: Drivers, r: redis.Redis, name: Name, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    s = name("s")
    p = drivers.producer(s)
    sent = [tracing.send(p, {"n": str(i)}) for i in range(3)]
    sent += tracing.send_many(p, [{"n": "3"}, {"n": "4"}])
    fields = [f for _, f in r.xrange(s)]
    assert all(f[TRACEPARENT.encode()].startswith(b"00-") for f in fields)  # W3C, version 00
    c = drivers.consumer(s, "g", batch_size=10, max_wait_ms=30)
    handled: list[str] = []

    def handle(msg: Message) -> None:
        assert trace.get_current_span().get_span_context().is_valid
        handled.append(msg.id)
        if msg.fields["n"] == "4":
            raise ValueError("four is bad")

    def stop_after(batch: Batch) -> None:
        handler(batch)
        if len(handled) >= 5:
            c.stop()

    handler = tracing.each(handle, group="g")
    c.run(stop_after)
    assert handled == sent

    sends = named(spans, f"send {s}")
    assert len(sends) == 4  # three sends, one send_many
    assert all(span.kind is SpanKind.PRODUCER for span in sends)
    assert [span.attributes["messaging.message.id"] for span in sends[:3]] == sent[:3]
    assert sends[3].attributes["messaging.batch.message_count"] == 2
    (batch_span,) = [span for span in spans.get_finished_spans() if span.name == f"process {s}"]
    assert batch_span.kind is SpanKind.CONSUMER
    assert batch_span.attributes["messaging.batch.message_count"] == 5
    assert batch_span.attributes["messaging.consumer.group.name"] == "g"
    assert len(batch_span.links) == 5
    per_message = {
        span.attributes["messaging.message.id"]: span for span in named(spans, f"process {s} ")
    }
    assert list(per_message) == sent
    parents = [sends[0], sends[1], sends[2], sends[3], sends[3]]
    for msg_id, send in zip(sent, parents, strict=True):
        span = per_message[msg_id]
        # a child of the producer's span: the same trace, continued
        assert span.context.trace_id == send.context.trace_id
        assert span.parent is not None and span.parent.span_id == send.context.span_id
        assert span.links[0].context.span_id == batch_span.context.span_id
    failed = per_message[sent[4]]
    assert failed.status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in failed.events)
    assert per_message[sent[0]].status.status_code is StatusCode.UNSET
    assert pending(r, s) == 1  # the failed one waits for its retry; the rest were acked


def test_a_message_without_a_trace_gets_a_span_under_the_batch(
    drivers: Drivers, r: redis.Redis, name: Name, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    s = name("s")
    r.xadd(s, {"n": "plain"})
    c = drivers.consumer(s, "g", max_wait_ms=30)

    def handle(batch: Batch) -> None:
        for msg in batch:
            with tracing.message_span(msg):
                batch.ack(msg)
        c.stop()

    c.run(tracing.wrap(handle))
    (batch_span,) = [span for span in spans.get_finished_spans() if span.name == f"process {s}"]
    (msg_span,) = named(spans, f"process {s} ")
    assert batch_span.links == ()
    assert msg_span.parent is not None and msg_span.parent.span_id == batch_span.context.span_id
    assert pending(r, s) == 0


def test_inject_carries_the_trace_to_the_next_stage(
    drivers: Drivers, r: redis.Redis, name: Name, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    s = name("s")
    nxt = "{" + s + "}:next"
    tracing.send(drivers.producer(s), {"n": "1"})
    c = drivers.consumer(s, "g", max_wait_ms=30)

    def handle(batch: Batch) -> None:
        for msg in batch:
            with tracing.message_span(msg):
                batch.forward(msg, nxt, tracing.inject({"n": msg.fields["n"]}))
        c.stop()

    c.run(tracing.wrap(handle))
    (send,) = named(spans, "send")
    (_, forwarded) = r.xrange(nxt)[0]
    trace_id = forwarded[TRACEPARENT.encode()].split(b"-")[1].decode()
    assert int(trace_id, 16) == send.context.trace_id  # the next stage continues the trace


def test_async_handlers_are_traced(
    r: redis.Redis, redis_url: str, name: Name, tracing: Tracing, spans: InMemorySpanExporter
) -> None:
    import conveyor

    s = name("s")

    async def main() -> list[str]:
        async with conveyor.connect(redis_url, asyncio=True) as client:
            p = conveyor.AsyncProducer(client, s)
            ids = [await tracing.send(p, {"n": "1"})]
            ids += await tracing.send_many(p, [{"n": "2"}])
            c = conveyor.AsyncConsumer(client, s, "g", max_wait_ms=30)
            seen: list[str] = []

            async def handle(msg: Message) -> None:
                await asyncio.sleep(0)
                seen.append(msg.id)
                if len(seen) == 2:
                    c.stop()

            await c.run(tracing.each(handle))
            assert seen == ids
            return ids

    ids = asyncio.run(main())
    per_message = named(spans, f"process {s} ")
    assert [span.attributes["messaging.message.id"] for span in per_message] == ids
    sends = named(spans, "send")
    assert [span.context.trace_id for span in sends] == [m.context.trace_id for m in per_message]
    assert pending(r, s) == 0


def test_without_opentelemetry_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    with pytest.raises(ConfigError, match=r"pip install 'conveyor\[otel\]'"):
        Tracing()
