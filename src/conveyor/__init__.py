"""conveyor: reliable batch processing on Redis Streams consumer groups.

>>> from conveyor import Producer, Consumer, connect   # doctest: +SKIP
"""

from conveyor.connection import connect
from conveyor.consumer import AsyncConsumer, Consumer
from conveyor.deadletter import AsyncDeadLetters, DeadLetter, DeadLetters
from conveyor.errors import (
    ConfigError,
    ConnectionLost,
    ConveyorError,
    FieldTypeError,
    GroupMissingError,
    PayloadError,
    ServerError,
    ServerNotFound,
)
from conveyor.models import Batch, Message
from conveyor.producer import AsyncProducer, Producer
from conveyor.server import EmbeddedServer

__version__ = "0.1.0"

__all__ = [
    "AsyncConsumer",
    "AsyncDeadLetters",
    "AsyncProducer",
    "Batch",
    "ConfigError",
    "ConnectionLost",
    "Consumer",
    "ConveyorError",
    "DeadLetter",
    "DeadLetters",
    "EmbeddedServer",
    "FieldTypeError",
    "GroupMissingError",
    "Message",
    "PayloadError",
    "Producer",
    "ServerError",
    "ServerNotFound",
    "__version__",
    "connect",
]
