"""The one exception tree of modelhost, shared by the client, broker and daemons.

Every error that crosses the wire is a (code, message) pair; the code picks the
class below, the message tells a person what to do next.

    ModelhostError                    base of everything raised by modelhost
    +-- TransportError                the broker could not be reached or spoke nonsense
    |   +-- BrokerUnavailable         broker_unavailable: nothing answers at the endpoint
    |   +-- ProtocolMismatch          protocol_mismatch: peers speak different versions
    |   +-- BadMessage                bad_message: a frame that is not a valid message
    |   +-- RequestLost               request_lost: the broker has no record of the request
    +-- RequestError                  the request itself is wrong; resending will not help
    |   +-- UnknownModel              unknown_model
    |   +-- UnknownMethod             unknown_method
    |   +-- BadArguments              bad_arguments
    |   +-- PayloadTooLarge           payload_too_large
    |   +-- InsufficientMemory        insufficient_memory: the daemon can never fit its device
    +-- OverCapacity                  over_capacity: the daemon's queue is full, retry later
    +-- Timeout                       timeout: the request's deadline passed
    +-- Cancelled                     cancelled: the request was cancelled
    +-- DaemonError                   the daemon could not serve the request
    |   +-- DaemonCrashed             daemon_crashed: the process died during the call
    |   +-- DaemonUnavailable         daemon_unavailable: not started, failed to load
    |   +-- EngineError               engine_error: the model code raised an exception
    +-- InternalError                 internal: a bug in modelhost; please report it
    +-- StateError                    a client object used in the wrong lifecycle state

Nothing of ZeroMQ or msgpack leaks from a client: a ZeroMQ failure (a malformed
endpoint, a socket closed under the client) is raised as a TransportError from the
zmq.ZMQError, a reply that is not msgpack as a BadMessage from the msgpack error.
"""


class ModelhostError(Exception):
    """Base class of every modelhost error; `code` is the wire code."""

    code = "internal"

    def __init__(self, message="", details=None):
        super().__init__(message)
        self.message = message
        # Structured extras from the wire (for example the daemon name, or the
        # remote exception type of an engine error).
        self.details = dict(details or {})

    def __str__(self):
        return "[{}] {}".format(self.code, self.message)


class TransportError(ModelhostError):
    code = "transport"


class BrokerUnavailable(TransportError):
    code = "broker_unavailable"


class ProtocolMismatch(TransportError):
    code = "protocol_mismatch"


class BadMessage(TransportError):
    code = "bad_message"


class RequestLost(TransportError):
    code = "request_lost"


class RequestError(ModelhostError):
    code = "bad_request"


class UnknownModel(RequestError):
    code = "unknown_model"


class UnknownMethod(RequestError):
    code = "unknown_method"


class BadArguments(RequestError):
    code = "bad_arguments"


class PayloadTooLarge(RequestError):
    code = "payload_too_large"


class InsufficientMemory(RequestError):
    """The daemon's footprint (with a call's peak) exceeds its device's threshold even
    with every other daemon evicted: waiting will not help, configuration will."""

    code = "insufficient_memory"


class OverCapacity(ModelhostError):
    code = "over_capacity"


class Timeout(ModelhostError):
    code = "timeout"


class Cancelled(ModelhostError):
    code = "cancelled"


class DaemonError(ModelhostError):
    code = "daemon_error"


class DaemonCrashed(DaemonError):
    code = "daemon_crashed"


class DaemonUnavailable(DaemonError):
    code = "daemon_unavailable"


class EngineError(DaemonError):
    code = "engine_error"


class InternalError(ModelhostError):
    code = "internal"


class StateError(ModelhostError):
    code = "state"


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        for deeper in _all_subclasses(sub):
            yield deeper


ERRORS_BY_CODE = {cls.code: cls for cls in _all_subclasses(ModelhostError)}
ERRORS_BY_CODE[ModelhostError.code] = InternalError


def error_from_wire(code, message, details=None):
    """The exception for an error reply; an unknown code still raises a ModelhostError."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        error = ModelhostError(message, details)
        error.code = code
        return error
    return cls(message, details)
