"""modelhost: keep heavy generative models warm and share one GPU between them.

    from modelhost import Client
    with Client() as client:
        speech = client.call("espeak", "tts", text="hello")
"""

from ._async_client import AsyncClient
from ._client import Client, ClientState, Stream
from ._messages import Progress
from .models import Audio
from .errors import (
    BadArguments,
    BadMessage,
    BrokerUnavailable,
    Cancelled,
    DaemonCrashed,
    DaemonError,
    DaemonUnavailable,
    EngineError,
    InsufficientMemory,
    InternalError,
    ModelhostError,
    OverCapacity,
    PayloadTooLarge,
    ProtocolMismatch,
    RequestError,
    RequestLost,
    StateError,
    Timeout,
    TransportError,
    UnknownMethod,
    UnknownModel,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "ClientState", "Stream", "Progress", "Audio",
    "ModelhostError", "TransportError", "BrokerUnavailable", "ProtocolMismatch", "BadMessage",
    "RequestLost", "RequestError", "UnknownModel", "UnknownMethod", "BadArguments",
    "PayloadTooLarge", "InsufficientMemory", "OverCapacity", "Timeout", "Cancelled",
    "DaemonError", "DaemonCrashed", "DaemonUnavailable", "EngineError", "InternalError",
    "StateError",
]
