"""conveyor: reliable batch processing on Redis Streams consumer groups.

>>> from conveyor import Producer, Consumer, connect   # doctest: +SKIP
"""

from conveyor.acl import acl_rules
from conveyor.connection import connect
from conveyor.consumer import AsyncConsumer, Consumer
from conveyor.deadletter import AsyncDeadLetters, DeadLetter, DeadLetters
from conveyor.errors import (
    ConfigError,
    ConnectionLost,
    ConveyorError,
    FieldTypeError,
    GroupMissingError,
    HandlerTimeout,
    PayloadError,
    ServerError,
    ServerNotFound,
)
from conveyor.models import (
    Batch,
    CleanupReport,
    ConsumerInfo,
    GroupInfo,
    Health,
    Message,
    MovedEntries,
    ScaleDecision,
    ScaleSample,
    StreamInfo,
    TrimReport,
)
from conveyor.monitor import AsyncMonitor, Monitor, Snapshot
from conveyor.producer import AsyncProducer, Producer
from conveyor.reader import AsyncStreamReader, StreamReader
from conveyor.retention import async_safe_trim, safe_trim
from conveyor.scaler import AsyncScaler, Scaler
from conveyor.server import EmbeddedServer

__version__ = "0.1.0"

__all__ = [
    "AsyncConsumer",
    "AsyncDeadLetters",
    "AsyncMonitor",
    "AsyncProducer",
    "AsyncScaler",
    "AsyncStreamReader",
    "Batch",
    "CleanupReport",
    "ConfigError",
    "ConnectionLost",
    "Consumer",
    "ConsumerInfo",
    "ConveyorError",
    "DeadLetter",
    "DeadLetters",
    "EmbeddedServer",
    "FieldTypeError",
    "GroupInfo",
    "GroupMissingError",
    "HandlerTimeout",
    "Health",
    "Message",
    "Monitor",
    "MovedEntries",
    "PayloadError",
    "Producer",
    "ScaleDecision",
    "ScaleSample",
    "Scaler",
    "ServerError",
    "ServerNotFound",
    "Snapshot",
    "StreamInfo",
    "StreamReader",
    "TrimReport",
    "__version__",
    "acl_rules",
    "async_safe_trim",
    "connect",
    "safe_trim",
]
