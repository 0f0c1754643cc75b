"""The whole wire contract of modelhost; nothing else builds or parses frames.

A message is a ZeroMQ multipart message. After the routing envelope (added and
removed by ROUTER sockets), frame 0 is a msgpack map, the *header*; the frames
after it are raw binary payloads. A payload is referenced from the header by an
msgpack extension value that holds its frame index, so megabytes of audio or
video never pass through msgpack and a broker forwards them without copying.

Every header carries `v`, the protocol version, and either `op` (a command)
or `kind` (a reply). Peers check the version on every message, so a peer that
reconnects after an upgrade gets a clear error instead of a misparse.

Client -> broker (`op`):   call, cancel, ping, ps, supervisor, load, unload, pin, unpin
Broker -> daemon (`op`):   call, cancel, heartbeat, reregister, tier
Daemon -> broker (`op`):   register, state, heartbeat
Replies (`kind`):          partial, progress, result, error, cancelled, pong

Every request id gets exactly one terminal reply: result, error or cancelled.

This module runs on Python 3.7 with only pyzmq and msgpack (numpy is used when
a value is an array and numpy is importable).
"""

import math
import reprlib
import sys
import threading

import msgpack
import zmq

from .errors import BadArguments, BadMessage, ProtocolMismatch

VERSION = 1

# Heartbeats, as in the ZeroMQ Guide's Majordomo: any message counts as proof
# of life, and a peer silent for LIVENESS intervals is taken for dead.
HEARTBEAT_S = 1.0
LIVENESS = 3

# Commands.
CALL = "call"
CANCEL = "cancel"
PING = "ping"
PS = "ps"
SUPERVISOR = "supervisor"
REGISTER = "register"
STATE = "state"
HEARTBEAT = "heartbeat"
REREGISTER = "reregister"
# Memory operations a client asks of the broker; each is a request with one
# terminal reply (load and unload answer once the daemon is at the tier).
LOAD = "load"
UNLOAD = "unload"
PIN = "pin"
UNPIN = "unpin"
# Broker -> daemon: move to a memory tier ({"tier": Tier.*}).
TIER = "tier"

# Reply kinds.
PARTIAL = "partial"
PROGRESS = "progress"
RESULT = "result"
ERROR = "error"
CANCELLED = "cancelled"
PONG = "pong"
TERMINAL_KINDS = frozenset((RESULT, ERROR, CANCELLED))


class DaemonState:
    """What `ps` shows for a daemon. Plain strings so they travel in msgpack."""

    STARTING = "starting"  # process launched (or expected), not registered yet
    LOADING = "loading"  # engine.load() running
    READY = "ready"  # loaded and idle
    BUSY = "busy"  # loaded and running calls up to its concurrency
    OFFLOADING = "offloading"  # engine.offload() running
    OFFLOADED = "offloaded"  # weights in host RAM, process alive
    ONLOADING = "onloading"  # engine.onload() running
    UNLOADING = "unloading"  # engine.unload() running
    UNLOADED = "unloaded"  # process alive, weights released
    FAILED = "failed"  # load failed; calls are refused with the load error
    CRASHED = "crashed"  # the process died; waiting for its restart
    STOPPED = "stopped"  # deliberately not running
    ALL = (STARTING, LOADING, READY, BUSY, OFFLOADING, OFFLOADED, ONLOADING, UNLOADING,
           UNLOADED, FAILED, CRASHED, STOPPED)


class Tier:
    """Where a daemon's weights are, from most to least memory held on its device."""

    RESIDENT = "resident"  # on the device, serving
    OFFLOADED = "offloaded"  # in host RAM (engine offload()), back with onload()
    UNLOADED = "unloaded"  # released (engine unload()), the process stays
    STOPPED = "stopped"  # no process
    ALL = (RESIDENT, OFFLOADED, UNLOADED, STOPPED)


class Priority:
    INTERACTIVE = "interactive"
    NORMAL = "normal"
    BATCH = "batch"
    ALL = (INTERACTIVE, NORMAL, BATCH)


# msgpack extension codes for values that live in payload frames.
_EXT_BYTES = 1  # data: msgpack int, the frame index
_EXT_ARRAY = 2  # data: msgpack [frame index, numpy dtype str, shape]

_BINARY_TYPES = (bytes, bytearray, memoryview)


_numpy_lock = threading.Lock()
_numpy_whole = None  # the numpy module, once seen fully imported


def _numpy():
    # Only a numpy that someone already imported: a value cannot be an array
    # otherwise, and the broker and numpy-less daemons never import it.
    global _numpy_whole
    numpy = sys.modules.get("numpy")
    if numpy is None or numpy is _numpy_whole:
        return numpy
    if getattr(getattr(numpy, "__spec__", None), "_initializing", False):
        # Another thread is importing it (a call's first array on another
        # slot, an engine's load): until it is done its attributes are
        # missing, so wait for it.
        return _import_numpy()
    _numpy_whole = numpy
    return numpy


def _import_numpy():
    """numpy, imported whole, or None where it is not installed.

    One import at a time: a slot thread must never see the module another
    one is still importing.
    """
    with _numpy_lock:
        try:
            import numpy
        except ImportError:
            return None
    return numpy


def _dtype_to_wire(dtype):
    # Structured dtypes need their fields; dtype.str would flatten them to |V<n>.
    return dtype.descr if dtype.fields is not None else dtype.str


def _dtype_from_wire(numpy, spec):
    if isinstance(spec, list):
        spec = [tuple(tuple(part) if isinstance(part, list) else part for part in field)
                for field in spec]
    return numpy.dtype(spec)


def externalize(value, frames):
    """`value` with every binary leaf moved into `frames` and replaced by a reference."""
    if isinstance(value, _BINARY_TYPES):
        frames.append(value)
        return msgpack.ExtType(_EXT_BYTES, msgpack.packb(len(frames) - 1))
    if isinstance(value, dict):
        return {key: externalize(item, frames) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [externalize(item, frames) for item in value]
    numpy = _numpy()
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            if value.dtype.hasobject:
                raise TypeError("arrays of Python objects cannot be sent; use a numeric dtype")
            # A flat uint8 view carries any dtype (datetime64, structured, ...)
            # as raw bytes, without a copy when the array is contiguous.
            data = numpy.ascontiguousarray(value).reshape(-1).view(numpy.uint8)
            frames.append(memoryview(data) if data.size else b"")
            meta = [len(frames) - 1, _dtype_to_wire(value.dtype), list(value.shape)]
            return msgpack.ExtType(_EXT_ARRAY, msgpack.packb(meta))
        if isinstance(value, numpy.generic):
            return value.item()  # numpy scalars travel as plain msgpack values
    return value


def internalize(value, frames):
    """The inverse of externalize: references replaced by bytes or numpy arrays."""
    if isinstance(value, msgpack.ExtType):
        return _resolve(value, frames)
    if isinstance(value, dict):
        return {key: internalize(item, frames) for key, item in value.items()}
    if isinstance(value, list):
        return [internalize(item, frames) for item in value]
    return value


def _frame_at(frames, index):
    if not isinstance(index, int) or not 0 <= index < len(frames):
        raise BadMessage("a value refers to payload frame {!r}, but the message has {} "
                         "payload frames".format(index, len(frames)))
    return frames[index]


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _resolve(ext, frames):
    try:
        meta = msgpack.unpackb(ext.data, raw=False)
    except Exception as exc:
        raise BadMessage("a payload reference is not valid msgpack") from exc
    if ext.code == _EXT_BYTES:
        frame = _frame_at(frames, meta)
        return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    if ext.code == _EXT_ARRAY:
        if not (isinstance(meta, list) and len(meta) == 3):
            raise BadMessage("an array reference must be [frame, dtype, shape]")
        index, dtype, shape = meta
        frame = _frame_at(frames, index)
        numpy = _import_numpy()
        if numpy is None:
            # No numpy here: hand over the raw data with what is needed to rebuild it.
            return {"dtype": dtype, "shape": shape, "data": bytes(_buffer(frame))}
        try:
            # Zero-copy view on the received frame (read-only).
            array = numpy.frombuffer(_buffer(frame), dtype=_dtype_from_wire(numpy, dtype))
            return array.reshape(shape)
        except (TypeError, ValueError) as exc:
            raise BadMessage("array payload does not match its dtype {} and shape {}: {}"
                             .format(dtype, shape, exc)) from exc
    raise BadMessage("unknown payload reference type {}".format(ext.code))


# Plain ints: pyzmq's send_multipart/recv_multipart combine enum flags on
# every frame, which costs more than the send itself for small messages.
_SNDMORE = int(zmq.SNDMORE)
# Below this size a frame is cheaper copied than tracked for zero-copy.
_COPY_BELOW = 64 * 1024


def send(socket, frames):
    """Send a multipart message: small frames copied, large ones and zmq.Frames zero-copy."""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        small = not isinstance(frame, zmq.Frame) and len(frame) < _COPY_BELOW
        socket.send(frame, _SNDMORE if index < last else 0, copy=small)


_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def readable(socket):
    """Whether a message is waiting (EVENTS with int constants: enums cost more)."""
    return socket.getsockopt(_EVENTS) & _POLLIN


def recv(socket, flags=0):
    """Receive a multipart message as zmq.Frames (payloads are never copied)."""
    frame = socket.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = socket.recv(copy=False)
        frames.append(frame)
    return frames


def encode(header, payloads=()):
    """Frames for a message: the packed header (with the version) and the payloads."""
    header = dict(header)
    header["v"] = VERSION
    return [msgpack.packb(header, use_bin_type=True)] + list(payloads)


def encode_value_message(header, field, value):
    """Frames for a header whose `field` holds `value`, binary leaves moved to frames."""
    payloads = []
    header = dict(header)
    header[field] = externalize(value, payloads)
    return encode(header, payloads)


def decode_header(frame):
    """The header map of a message's frame 0; BadMessage or ProtocolMismatch if it is not one."""
    raw = frame.bytes if hasattr(frame, "bytes") else frame
    try:
        header = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise BadMessage("the header frame is not valid msgpack ({})".format(
            type(exc).__name__)) from exc
    if not isinstance(header, dict):
        raise BadMessage("the header frame must be a msgpack map, not {}".format(
            type(header).__name__))
    version = header.get("v")
    if version != VERSION:
        # The request id travels in details so that the error reply can name it.
        raise ProtocolMismatch(
            "this peer speaks modelhost protocol {} but the message says {}; install "
            "the same modelhost version on both sides".format(VERSION, _shown(version)),
            {"id": header.get("id") if is_request_id(header.get("id")) else None})
    return header


def decode(frames):
    """(header, payload frames) of a message without its routing envelope."""
    if not frames:
        raise BadMessage("empty message: a header frame is required")
    return decode_header(frames[0]), frames[1:]


# The broker's event stream (a PUB socket): frame 0 is the event's kind, which
# subscribers filter on, frame 1 the event as a msgpack map with the version.
EVENT_KINDS = ("state", "move", "moved", "request", "error")


def encode_event(event):
    return [event["kind"].encode(), msgpack.packb(dict(event, v=VERSION), use_bin_type=True)]


def decode_event(frames):
    """The event map of a message from the event stream; BadMessage if it is not one."""
    if len(frames) != 2:
        raise BadMessage("an event is two frames (kind, body), got {}".format(len(frames)))
    return decode_header(frames[1])


def error_header(request_id, code, message, details=None):
    header = {"kind": ERROR, "id": request_id, "code": code, "message": message}
    if details:
        header["details"] = details
    return header


# --- message schemas ---------------------------------------------------------
#
# One schema per message kind, checked by the receiver before anything acts on
# the message: types, finite numbers, ids that are hashable and equal to
# themselves, ranges. A message that fails gets a typed `bad_message` error
# (where there is a sender to answer), never an exception in the receiver's
# loop. Fields a schema does not name are never read by the receiver, so they
# are left alone (a newer peer may send more).

MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 64 * 1024
MAX_LIST = 100000  # ids in one ping, methods or calls in one register
MAX_TIMEOUT_S = 366 * 86400.0
MAX_PLAIN_DEPTH = 8  # nesting of the free-form maps that reach `ps` and the dashboard
PROCESS_STATUSES = ("pending", "starting", "running", "backoff", "failed", "stopped")


def _int(value, low=None):
    return isinstance(value, int) and not isinstance(value, bool) and (
        low is None or value >= low)


def _number(value, low=None, high=None):
    """A finite int or float within [low, high]: NaN and infinities never pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _text(value, limit=MAX_TEXT_CHARS):
    return isinstance(value, str) and len(value) <= limit


def is_request_id(value):
    """An id usable as a key: an int (never a float: NaN != NaN) or a bounded string."""
    return _int(value) or _text(value, MAX_ID_CHARS)


def _name(value):
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def _identity(value):
    return isinstance(value, bytes) and 0 < len(value) <= 255  # ZeroMQ's limit


def _list_of(accepts, limit=MAX_LIST):
    return lambda value: isinstance(value, list) and len(value) <= limit and all(
        accepts(item) for item in value)


def _or_none(accepts):
    return lambda value: value is None or accepts(value)


def _one_of(choices):
    return lambda value: isinstance(value, str) and value in choices


def is_plain(value, depth=0):
    """JSON-safe: str-keyed maps, lists, strings, finite numbers, bools and null."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, (int, float)):
        return _number(value)
    if depth >= MAX_PLAIN_DEPTH:
        return False
    if isinstance(value, list):
        return len(value) <= MAX_LIST and all(is_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item, depth + 1)
                   for key, item in value.items())
    return False


def _mem(value):
    # The daemon's own memory report: each figure bytes, or null when unknown.
    return isinstance(value, dict) and all(
        isinstance(key, str) and (item is None or _int(item, 0)) for key, item in value.items())


def _process(value):
    # One daemon's process facts in a supervisor report.
    return (isinstance(value, dict) and _one_of(PROCESS_STATUSES)(value.get("status"))
            and _or_none(lambda pid: _int(pid, 1))(value.get("pid"))
            and _or_none(lambda pid: _int(pid, 1))(value.get("exited_pid"))
            and _int(value.get("restarts", 0), 0)
            and _or_none(_text)(value.get("error")) and is_plain(value))


def _running_call(value):
    return (isinstance(value, dict) and is_request_id(value.get("id"))
            and _identity(value.get("client")) and _or_none(_name)(value.get("method"))
            and _or_none(lambda slot: _int(slot, 0))(value.get("slot")))


class _Field(object):
    __slots__ = ("required", "accepts", "description", "error")

    def __init__(self, required, accepts, description, error=BadMessage):
        self.required = required
        self.accepts = accepts
        self.description = description
        self.error = error


def _required(accepts, description, error=BadMessage):
    return _Field(True, accepts, description, error)


def _optional(accepts, description, error=BadMessage):
    return _Field(False, accepts, description, error)


_ID = _required(is_request_id, "an integer or a string of at most {} characters".format(
    MAX_ID_CHARS))
_MODEL = _required(_name, "the daemon's name, a non-empty string")
_PRIORITY = _optional(_one_of(Priority.ALL), "one of " + ", ".join(Priority.ALL))
_TIMEOUT = _optional(lambda value: _number(value, high=MAX_TIMEOUT_S) and value > 0,
                     "a finite, positive number of seconds (at most a year)")
_MEM = _optional(_mem, "a map of memory figures in bytes (non-negative integers or null)")
_ERROR_TEXT = _optional(_or_none(_text), "a string or null")
_STATE = _required(_one_of(DaemonState.ALL), "one of " + ", ".join(DaemonState.ALL))
_TIER = _optional(_or_none(_one_of(Tier.ALL)), "one of " + ", ".join(Tier.ALL) + " or null")
_FACTS = _optional(_or_none(lambda value: isinstance(value, dict) and is_plain(value)),
                   "a map of plain values (strings, numbers, lists, maps) or null")
_LOADS = _optional(_or_none(lambda value: _int(value, 0)), "a non-negative integer")

# Client -> broker, by `op`.
REQUEST_SCHEMAS = {
    CALL: {"id": _ID, "model": _MODEL,
           "method": _required(_name, "the operation's name, a non-empty string"),
           "args": _optional(lambda value: isinstance(value, dict), "a map of argument names "
                             "to values", BadArguments),
           "priority": _PRIORITY, "timeout": _TIMEOUT,
           "stream": _optional(lambda value: isinstance(value, bool), "true or false")},
    CANCEL: {"id": _ID},
    PING: {"id": _ID, "ids": _optional(_list_of(is_request_id), "a list of request ids")},
    PS: {"id": _ID},
    SUPERVISOR: {"id": _ID, "token": _required(_text, "the supervisor's token"),
                 "processes": _required(lambda value: isinstance(value, dict) and all(
                     _name(name) and _process(item) for name, item in value.items()),
                     "a map of daemon names to {status, pid, restarts, error}")},
    LOAD: {"id": _ID, "model": _MODEL, "priority": _PRIORITY, "timeout": _TIMEOUT},
    UNLOAD: {"id": _ID, "model": _MODEL, "priority": _PRIORITY, "timeout": _TIMEOUT},
    PIN: {"id": _ID, "model": _MODEL},
    UNPIN: {"id": _ID, "model": _MODEL},
}

# Daemon -> broker, by `op`.
DAEMON_SCHEMAS = {
    REGISTER: {
        "name": _required(_name, "the daemon's name, a non-empty string"),
        "pid": _required(lambda value: _int(value, 1), "a positive integer"),
        "interpreter": _optional(_or_none(_text), "a string"),
        "python": _optional(_or_none(_text), "a string"),
        "engine": _optional(_or_none(_text), "a string"),
        "methods": _optional(_list_of(_name), "a list of operation names"),
        "slots": _optional(_list_of(_identity, 1024), "a list of socket identities (bytes)"),
        "state": _STATE, "tier": _TIER,
        "tiers": _optional(_list_of(_one_of(Tier.ALL)), "a list of tiers"),
        "mem": _MEM, "error": _ERROR_TEXT, "facts": _FACTS, "loads": _LOADS,
        "uptime_s": _optional(lambda value: _number(value, 0), "a finite number >= 0"),
        "running": _optional(_list_of(_running_call), "a list of {id, client, method, slot}"),
    },
    STATE: {"state": _STATE, "tier": _TIER, "mem": _MEM, "error": _ERROR_TEXT,
            "facts": _FACTS, "loads": _LOADS,
            # The target of a move that failed, as the daemon was asked for it.
            "failed": _optional(_or_none(_name), "the tier it failed to reach, or null"),
            "took_s": _optional(_or_none(lambda value: _number(value, 0)),
                                "a finite number >= 0 or null")},
    HEARTBEAT: {"state": _optional(_one_of(DaemonState.ALL), "a daemon state"),
                "running": _optional(lambda value: _int(value, 0), "a non-negative integer"),
                "mem": _MEM},
}

# Daemon -> client through the broker, by `kind`. `value` is never read by the
# broker: it travels to the client as it came.
_REPLY = {"id": _ID, "client": _required(_identity, "the client's identity (bytes)"),
          "mem": _MEM}
REPLY_SCHEMAS = {
    PARTIAL: dict(_REPLY, seq=_optional(lambda value: _int(value, 0), "an integer >= 0")),
    PROGRESS: dict(_REPLY, fraction=_optional(_or_none(lambda value: _number(value, 0, 1)),
                                              "a number in [0, 1] or null")),
    RESULT: _REPLY,
    ERROR: dict(_REPLY, code=_required(_name, "an error code"),
                message=_optional(_or_none(_text), "a string")),
    CANCELLED: dict(_REPLY, message=_optional(_or_none(_text), "a string")),
}


# Bounded in depth and length: a hostile value may nest a thousand levels deep.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 40, 40


def _shown(value):
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(header, schemas, selector):
    """Raise BadMessage (or the field's error) unless `header` fits the schema its
    `selector` field (op or kind) names. The error's details carry the id when it
    is usable, so the reply can name the request."""
    name = header.get(selector)
    schema = schemas.get(name) if isinstance(name, str) else None
    request_id = header.get("id")
    details = {"id": request_id if is_request_id(request_id) else None}
    if schema is None:
        raise BadMessage("unknown {} {}; expected one of {}".format(
            selector, _shown(name), ", ".join(sorted(schemas))), details)
    for field, spec in schema.items():
        if field not in header:
            if spec.required:
                raise spec.error("a {} message needs `{}`: {}".format(
                    name, field, spec.description), details)
        elif not spec.accepts(header[field]):
            raise spec.error("`{}` of a {} message must be {}, not {}".format(
                field, name, spec.description, _shown(header[field])), details)
    return header


def check_request(header):
    return check(header, REQUEST_SCHEMAS, "op")


def check_daemon_message(header):
    return check(header, DAEMON_SCHEMAS, "op")


def check_reply(header):
    return check(header, REPLY_SCHEMAS, "kind")
