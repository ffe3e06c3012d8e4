"""The one exception tree of conveyor.

Errors are split by whose fault they are, so callers can catch the right thing::

    ConveyorError
     ├── ConfigError (ValueError)          the caller passed a bad argument
     ├── FieldTypeError (TypeError)        a message field holds a value Redis cannot store
     ├── PayloadError (ValueError)         a payload could not be decoded, or is too large
     ├── ServerError                       the server replied with an error we cannot absorb
     │    └── GroupMissingError            the stream or group vanished (NOGROUP)
     ├── ConnectionLost (ConnectionError)  the connection broke or timed out; safe to retry
     ├── HandlerTimeout (TimeoutError)     a handler ran past handler_timeout_ms
     └── ServerNotFound (RuntimeError)     no server binary to start (embedded server, tests)

Every message names the argument, stream or server reply concerned, and never a password.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectionLost",
    "ConveyorError",
    "FieldTypeError",
    "GroupMissingError",
    "HandlerTimeout",
    "PayloadError",
    "ServerError",
    "ServerNotFound",
]


class ConveyorError(Exception):
    """Base class of every error conveyor raises on purpose."""


class ConfigError(ConveyorError, ValueError):
    """A constructor or function argument is out of range or of the wrong kind."""


class FieldTypeError(ConveyorError, TypeError):
    """A field value is not str, bytes, int or float."""


class PayloadError(ConveyorError, ValueError):
    """A message's payload field is missing or is not valid for its codec, or a message is
    larger than ``max_message_bytes``."""


class ServerError(ConveyorError):
    """The server answered with an error reply that conveyor cannot absorb."""


class GroupMissingError(ServerError):
    """The consumer group or its stream does not exist (NOGROUP)."""


class ConnectionLost(ConveyorError, ConnectionError):
    """The connection to the server broke or timed out.

    What was in flight may or may not have reached the server; nothing is lost, because
    unacknowledged entries stay in the group's pending list and come back.
    """


class HandlerTimeout(ConveyorError, TimeoutError):
    """A handler ran past ``handler_timeout_ms``; its unsettled messages were given up to the
    other consumers (an asyncio handler is cancelled)."""


class ServerNotFound(ConveyorError, RuntimeError):
    """No server binary could be found to start (the embedded Valkey or a test server)."""
