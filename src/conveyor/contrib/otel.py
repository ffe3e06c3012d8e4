"""OpenTelemetry tracing: a span per send, per batch and per message, with the producer's trace
carried in the message and continued by the consumer.

Needs opentelemetry-api, the ``otel`` extra (``pip install 'conveyor[otel]'``); spans go
wherever the application's tracer provider sends them (the SDK and an exporter are the
application's choice). The trace context travels in W3C Trace Context form, in the message's
``traceparent`` field (and ``tracestate`` when there is one), so any consumer, in any language,
can continue it::

    tracing = Tracing()
    tracing.send(producer, {"order_id": "42"})     # span "send orders", traceparent added
    consumer.run(tracing.each(handle_one))          # span "process orders" per batch, and a
                                                    # child of the send per message handled

``each(fn)`` makes a batch handler of a function of one message: it acks the message when
``fn`` returns and fails it when ``fn`` raises (the span records the exception). A handler of
whole batches uses ``wrap(handler)`` for the batch span and ``message_span(msg)`` around the
work on each message. ``inject(fields)`` adds the current context to fields about to be sent
or forwarded (``batch.forward``), so the trace goes on to the next stage.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from conveyor.errors import ConfigError
from conveyor.models import Batch, Message

__all__ = ["INSTALL_HINT", "TRACEPARENT", "TRACESTATE", "Tracing"]

INSTALL_HINT = "pip install 'conveyor[otel]'"
#: the message fields that carry the trace context (W3C Trace Context's header names)
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
_SYSTEM = "redis"


def _require_otel() -> None:
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"tracing needs opentelemetry-api, which is not installed: {INSTALL_HINT}"
        ) from None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


class _FieldsGetter:
    """Reads the trace context from a message's fields, whether they are str or bytes."""

    def get(self, carrier: Mapping[Any, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            value = carrier.get(key.encode())
        text = _text(value)
        return None if text is None else [text]

    def keys(self, carrier: Mapping[Any, Any]) -> list[str]:
        return [k for k in (_text(key) for key in carrier) if k is not None]


class Tracing:
    """Spans for producers and consumers, from ``tracer_provider`` (the global one by default).

    >>> tracing = Tracing()                                   # doctest: +SKIP
    >>> tracing.send(Producer(r, "orders"), {"order_id": "42"})   # doctest: +SKIP
    >>> Consumer(r, "orders", group="billing").run(tracing.each(handle))  # doctest: +SKIP
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        _require_otel()
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        import conveyor

        self._trace = trace
        self._tracer = trace.get_tracer(
            "conveyor", conveyor.__version__, tracer_provider=tracer_provider
        )
        self._propagator = TraceContextTextMapPropagator()
        self._getter = _FieldsGetter()

    # -- producing ----------------------------------------------------------------------------

    def inject(self, fields: Mapping[Any, Any]) -> dict[Any, Any]:
        """A copy of ``fields`` with the current trace context (``traceparent``, and
        ``tracestate`` when set); ``fields`` as they are when no span is active."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return {**fields, **carrier}

    def send(self, producer: Any, fields: Mapping[Any, Any], **options: Any) -> Any:
        """``producer.send(fields, **options)`` in a PRODUCER span ``send <stream>`` whose
        context goes in the message; returns what ``send`` returns (a coroutine's result, for
        an AsyncProducer: await it)."""
        if inspect.iscoroutinefunction(producer.send):
            return self._asend(producer, fields, options)
        with self._send_span(producer.stream, 1) as span:
            msg_id = producer.send(self.inject(fields), **options)
            span.set_attribute("messaging.message.id", msg_id)
            return msg_id

    async def _asend(self, producer: Any, fields: Mapping[Any, Any], options: Any) -> Any:
        with self._send_span(producer.stream, 1) as span:
            msg_id = await producer.send(self.inject(fields), **options)
            span.set_attribute("messaging.message.id", msg_id)
            return msg_id

    def send_many(self, producer: Any, rows: Any, **options: Any) -> Any:
        """``producer.send_many(rows, **options)`` in one PRODUCER span, whose context every
        row carries (rows must be mappings)."""
        rows = list(rows)
        if inspect.iscoroutinefunction(producer.send_many):
            return self._asend_many(producer, rows, options)
        with self._send_span(producer.stream, len(rows)):
            return producer.send_many([self.inject(row) for row in rows], **options)

    async def _asend_many(self, producer: Any, rows: list[Any], options: Any) -> Any:
        with self._send_span(producer.stream, len(rows)):
            return await producer.send_many([self.inject(row) for row in rows], **options)

    @contextlib.contextmanager
    def _send_span(self, stream: str, count: int) -> Iterator[Any]:
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": stream,
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        kind = self._trace.SpanKind.PRODUCER
        with self._tracer.start_as_current_span(
            f"send {stream}", kind=kind, attributes=attributes
        ) as span:
            yield span

    # -- consuming ----------------------------------------------------------------------------

    def context_of(self, msg: Message) -> Any:
        """The trace context ``msg`` carries (an empty context when it carries none)."""
        from opentelemetry.context import Context

        getter: Any = self._getter  # a Getter by shape; its base class is imported lazily
        return self._propagator.extract(msg.fields, Context(), getter=getter)

    @contextlib.contextmanager
    def batch_span(self, batch: Batch, group: str | None = None) -> Iterator[Any]:
        """A CONSUMER span ``process <stream>`` around the handling of ``batch``, linked to the
        trace of every message that carries one."""
        streams = list(dict.fromkeys(m.stream for m in batch))
        links = []
        for msg in batch:
            parent = self._trace.get_current_span(self.context_of(msg)).get_span_context()
            if parent.is_valid:
                links.append(self._trace.Link(parent))
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "process",
            "messaging.destination.name": ",".join(streams),
            "messaging.batch.message_count": len(batch),
        }
        if group is not None:
            attributes["messaging.consumer.group.name"] = group
        with self._tracer.start_as_current_span(
            f"process {','.join(streams)}",
            kind=self._trace.SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        ) as span:
            yield span

    @contextlib.contextmanager
    def message_span(self, msg: Message) -> Iterator[Any]:
        """A span ``process <stream> <id>`` around the work on one message, a child of the
        producer's span when the message carries its context (linked to the batch span in
        hand), else of the current span. An exception is recorded and re-raised."""
        parent_context = self.context_of(msg)
        parent = self._trace.get_current_span(parent_context).get_span_context()
        current = self._trace.get_current_span().get_span_context()
        links = [self._trace.Link(current)] if parent.is_valid and current.is_valid else []
        with self._tracer.start_as_current_span(
            f"process {msg.stream} {msg.id}",
            context=parent_context if parent.is_valid else None,
            kind=self._trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": msg.stream,
                "messaging.message.id": msg.id,
                "messaging.redis.deliveries": msg.deliveries,
            },
        ) as span:
            yield span

    def wrap(self, handler: Callable[[Batch], Any], group: str | None = None) -> Any:
        """``handler`` (a batch handler, plain or async) inside a batch span."""
        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def traced_async(batch: Batch) -> Any:
                with self.batch_span(batch, group):
                    return await handler(batch)

            return traced_async

        @functools.wraps(handler)
        def traced(batch: Batch) -> Any:
            with self.batch_span(batch, group):
                return handler(batch)

        return traced

    def each(
        self,
        fn: Callable[[Message], Any] | Callable[[Message], Awaitable[Any]],
        group: str | None = None,
    ) -> Any:
        """A batch handler that calls ``fn(msg)`` for each message in its own span, inside the
        batch span: acks the message when ``fn`` returns, fails it (span status ERROR) when
        ``fn`` raises. ``fn`` may be a coroutine function (for an AsyncConsumer)."""
        if inspect.iscoroutinefunction(fn):

            async def each_async(batch: Batch) -> None:
                with self.batch_span(batch, group):
                    for msg in batch:
                        try:
                            with self.message_span(msg):
                                await fn(msg)
                        except Exception as exc:
                            batch.fail(msg, exc)
                        else:
                            batch.ack(msg)

            return each_async

        def each_sync(batch: Batch) -> None:
            with self.batch_span(batch, group):
                for msg in batch:
                    try:
                        with self.message_span(msg):
                            fn(msg)
                    except Exception as exc:
                        batch.fail(msg, exc)
                    else:
                        batch.ack(msg)

        return each_sync
