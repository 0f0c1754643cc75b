"""The whole wire contract of modelhost; nothing else builds or parses frames.

A message is a ZeroMQ multipart message. After the routing envelope (added and
removed by ROUTER sockets), frame 0 is a msgpack map, the *header*; the frames
after it are raw binary payloads. A payload is referenced from the header by an
msgpack extension value that holds its frame index, so megabytes of audio or
video never pass through msgpack and a broker forwards them without copying.
Above the shared-memory threshold a payload lies in a segment instead, and the
reference names where (see _shm.py); the header's `shm` field lists a
message's segments, and a call's also offers to take its reply that way.

Every header carries `v`, the protocol version, and either `op` (a command)
or `kind` (a reply). Peers check the version on every message, so a peer that
reconnects after an upgrade gets a clear error instead of a misparse.

Client -> broker (`op`):   call, cancel, ping, ps, supervisor, load, unload, pin, unpin
Broker -> daemon (`op`):   call, cancel, heartbeat, reregister, tier
Daemon -> broker (`op`):   register, state, heartbeat
Replies (`kind`):          partial, progress, result, error, cancelled, pong

Every request id gets exactly one terminal reply: result, error or cancelled.

Each kind has one builder here, which returns its frames (`call_message`,
`register_message`, ..., `result_reply`, `error_reply(id, error)`, ...), and
one schema, which its receiver checks (`check_request`, `check_daemon_message`,
`check_reply`); `reply_value` and `reply_error` read what a reply carries.
Peers build no header by hand. The events of the broker's PUB socket:
`encode_event`, `decode_event`.

This module runs on Python 3.7 with only pyzmq and msgpack (numpy is used when
a value is an array and numpy is importable).

Its length (about 530 lines): one builder and one schema per message kind, kept
together on purpose, so that the whole wire can be read in one file.
"""

import msgpack
import zmq

from . import _shm
# The value codec and the schema check are in modules of their own; what of
# them others use is reached through this one.
from ._payloads import externalize, internalize  # noqa: F401 (re-exported)
from ._schemas import MAX_PLAIN_DEPTH  # noqa: F401 (re-exported)
from ._schemas import (
    MAX_ID_CHARS, check, is_identity, is_int, is_name, is_number, is_plain, is_request_id,
    is_text, list_of, one_of, optional, or_none, required, shown)
from .errors import BadArguments, BadMessage, Cancelled, ProtocolMismatch, error_from_wire

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


# The state a daemon shows at rest at each tier, and while it moves between two
# (the daemon reports them; the broker expects them).
STATE_OF_TIER = {Tier.RESIDENT: DaemonState.READY, Tier.OFFLOADED: DaemonState.OFFLOADED,
                 Tier.UNLOADED: DaemonState.UNLOADED, Tier.STOPPED: DaemonState.STOPPED}
MOVING_STATE = {(Tier.UNLOADED, Tier.RESIDENT): DaemonState.LOADING,
                (Tier.OFFLOADED, Tier.RESIDENT): DaemonState.ONLOADING,
                (Tier.RESIDENT, Tier.OFFLOADED): DaemonState.OFFLOADING,
                (Tier.RESIDENT, Tier.UNLOADED): DaemonState.UNLOADING,
                (Tier.OFFLOADED, Tier.UNLOADED): DaemonState.UNLOADING}


class Priority:
    INTERACTIVE = "interactive"
    NORMAL = "normal"
    BATCH = "batch"
    ALL = (INTERACTIVE, NORMAL, BATCH)


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


def encode_value_message(header, field, value, shm=None):
    """Frames for a header whose `field` holds `value`, binary leaves moved to frames
    (with `shm`, a shared-memory Writer, those over its threshold into a segment)."""
    return _value_frames(dict(header), field, value, shm)


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
            "the same modelhost version on both sides".format(VERSION, shown(version)),
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


# --- builders: the frames of each message kind ----------------------------------
#
# Each returns the message's frames, version included, ready for send(): the
# header first, then the payload frames its value refers to. Fields a
# receiver reads as "absent" (a call's timeout, a reply's client and mem
# outside the daemon) are left out rather than sent as null.


def _frames(header, payloads=()):
    # Builders make a fresh header, so the version goes in without a copy.
    header["v"] = VERSION
    return [msgpack.packb(header, use_bin_type=True)] + list(payloads)


def _value_frames(header, field, value, shm=None):
    payloads = []
    header[field] = externalize(value, payloads, None if shm is None else shm.place)
    if shm is not None and shm.placed:
        written = shm.commit()
        if written is None:
            # The segment could not be written (logged): every leaf in frames after all.
            payloads = []
            header[field] = externalize(value, payloads)
        else:
            header["shm"] = dict(header.get("shm") or {}, **written)
    return _frames(header, payloads)


def _reply_route(header, client, mem):
    # A daemon's reply names the client the broker routes it to, and the
    # call's memory peaks; the broker's own replies go straight to the client.
    if client is not None:
        header["client"] = client
    if mem is not None:
        header["mem"] = mem
    return header


# Client -> broker.

def call_message(request_id, model, method, args, priority=Priority.NORMAL, stream=False,
                 timeout=None, shm=None, writer=None):
    """`shm`: the offer to take the reply in shared memory ({token, owner, tag});
    `writer`: the shared-memory Writer for large arguments (both from ClientSegments)."""
    header = {"op": CALL, "id": request_id, "model": model, "method": method,
              "priority": priority, "stream": stream}
    if timeout is not None:
        header["timeout"] = float(timeout)
    if shm is not None:
        header["shm"] = shm
    return _value_frames(header, "args", args, writer)


def cancel_message(request_id, client=None):
    """Client -> broker; broker -> daemon with the identity of the client that asked."""
    header = {"op": CANCEL, "id": request_id}
    if client is not None:
        header["client"] = client
    return _frames(header)


def ping_message(request_id, ids):
    """Proof of life while requests are outstanding; `ids` asks which the broker knows."""
    return _frames({"op": PING, "id": request_id, "ids": ids})


def ps_message(request_id):
    return _frames({"op": PS, "id": request_id})


def model_message(op, request_id, model, timeout=None, priority=None):
    """A memory operation on one daemon: LOAD, UNLOAD, PIN or UNPIN."""
    header = {"op": op, "id": request_id, "model": model}
    if priority is not None:
        header["priority"] = priority
    if timeout is not None:
        header["timeout"] = float(timeout)
    return _frames(header)


def supervisor_message(request_id, processes, token):
    """The supervisor's report: {daemon name: {status, pid, restarts, error, ...}}."""
    return _frames({"op": SUPERVISOR, "id": request_id, "processes": processes,
                    "token": token})


# Broker -> daemon.

def dispatch_message(request_id, client, forward, payloads, timeout=None):
    """A call for a daemon slot: `forward` (call_forward()) with the payloads it refers to."""
    header = dict(forward, op=CALL, id=request_id, client=client)
    if timeout is not None:
        header["timeout"] = timeout
    return _frames(header, payloads)


def tier_message(tier):
    return _frames({"op": TIER, "tier": tier})


def reregister_message():
    return _frames({"op": REREGISTER})


def heartbeat_message(state=None, running=None, mem=None):
    """Both ways: the broker's is bare; a daemon's says its state, running calls, memory."""
    header = {"op": HEARTBEAT}
    if state is not None:
        header.update(state=state, running=running, mem=mem)
    return _frames(header)


# Daemon -> broker.

def register_message(*, name, pid, interpreter, python, engine, methods, slots, state, tier,
                     tiers, mem, error, facts, loads, uptime_s, running, shm=None):
    """Who the daemon is and where it stands; `running`: [{id, client, method, slot}];
    `shm`: its shared-memory directory's token (_shm.token_of), None when off."""
    return _frames({
        "op": REGISTER, "name": name, "pid": pid, "interpreter": interpreter,
        "python": python, "engine": engine, "methods": methods, "slots": slots,
        "state": state, "tier": tier, "tiers": tiers, "mem": mem, "error": error,
        "facts": facts, "loads": loads, "uptime_s": uptime_s, "running": running,
        "shm": shm})


def state_message(*, state, tier, mem, loads, facts, error, took_s=None, failed=None):
    """A move between tiers began or ended; `failed`: the target of a move that failed."""
    return _frames({"op": STATE, "state": state, "tier": tier, "took_s": took_s, "mem": mem,
                    "loads": loads, "facts": facts, "error": error, "failed": failed})


# Replies: daemon -> client through the broker, and the broker's own.

def partial_reply(request_id, client, seq, value, writer=None):
    """`writer`: a shared-memory Writer for the call's caller, who offered (see call_message)."""
    return _value_frames(_reply_route({"kind": PARTIAL, "id": request_id, "seq": seq},
                                      client, None), "value", value, writer)


def progress_reply(request_id, client, fraction, stage, message):
    return _frames(_reply_route({"kind": PROGRESS, "id": request_id, "fraction": fraction,
                                 "stage": stage, "message": message}, client, None))


def result_reply(request_id, value, client=None, mem=None, writer=None):
    return _value_frames(_reply_route({"kind": RESULT, "id": request_id}, client, mem),
                         "value", value, writer)


def error_header(request_id, error):
    """The header of the error reply for `error`, a ModelhostError: its code, message, details."""
    header = {"kind": ERROR, "id": request_id, "code": error.code, "message": error.message}
    if error.details:
        header["details"] = error.details
    return header


def error_reply(request_id, error, client=None, mem=None):
    return _frames(_reply_route(error_header(request_id, error), client, mem))


def cancelled_reply(request_id, message, client=None, mem=None):
    return _frames(_reply_route({"kind": CANCELLED, "id": request_id, "message": message},
                                client, mem))


def pong_reply(request_id, known, broker, settled):
    """`known`: the pinged ids the broker knows; `settled`: "unknown" now means lost."""
    return _frames({"kind": PONG, "id": request_id, "known": known, "broker": broker,
                    "settled": settled})


# --- parsers: what a receiver reads ------------------------------------------------
#
# Every receiver decodes with decode() or decode_header(); the broker then
# checks each message against the schema of its kind (below) before it acts.


def call_forward(header):
    """What of a client's checked call travels on to the daemon (dispatch_message())."""
    forward = {"method": header["method"], "args": header["args"], "stream": header["stream"]}
    if "shm" in header:
        forward["shm"] = header["shm"]  # its segments and its offer, for the daemon
    return forward


def reply_value(header, payloads, segment=None):
    """The value of a result or partial reply: binary leaves as bytes, arrays as arrays;
    `segment` (a shared-memory Reader) maps what lies in segments."""
    try:
        return internalize(header.get("value"), payloads, segment)
    except RecursionError as exc:
        # Deeper than Python can walk: a typed error, like any malformed reply.
        raise BadMessage("the reply's value is nested too deeply to decode") from exc


def reply_error(header):
    """The ModelhostError that an error or cancelled reply stands for."""
    if header["kind"] == CANCELLED:
        return Cancelled(header.get("message") or "the call was cancelled")
    return error_from_wire(header.get("code", "internal"), header.get("message", ""),
                           header.get("details"))


# --- message schemas ---------------------------------------------------------
#
# One schema per message kind, checked by the receiver before anything acts on
# the message: types, finite numbers, ids that are hashable and equal to
# themselves, ranges. A message that fails gets a typed `bad_message` error
# (where there is a sender to answer), never an exception in the receiver's
# loop. Fields a schema does not name are never read by the receiver, so they
# are left alone (a newer peer may send more). An absent optional field with
# a default is filled in by the check, so the receiver reads one value, the
# one written here. How a schema is checked: `_schemas.py`.

MAX_TIMEOUT_S = 366 * 86400.0
PROCESS_STATUSES = ("pending", "starting", "running", "backoff", "failed", "stopped")


def _mem(value):
    # The daemon's own memory report: each figure bytes, or null when unknown.
    return isinstance(value, dict) and all(
        isinstance(key, str) and (item is None or is_int(item, 0)) for key, item in value.items())


def _process(value):
    # One daemon's process facts in a supervisor report.
    return (isinstance(value, dict) and one_of(PROCESS_STATUSES)(value.get("status"))
            and or_none(lambda pid: is_int(pid, 1))(value.get("pid"))
            and or_none(lambda pid: is_int(pid, 1))(value.get("exited_pid"))
            and is_int(value.get("restarts", 0), 0)
            and or_none(is_text)(value.get("error")) and is_plain(value))


def _running_call(value):
    return (isinstance(value, dict) and is_request_id(value.get("id"))
            and is_identity(value.get("client")) and or_none(is_name)(value.get("method"))
            and or_none(lambda slot: is_int(slot, 0))(value.get("slot")))


_ID = required(is_request_id, "an integer or a string of at most {} characters".format(
    MAX_ID_CHARS))
_MODEL = required(is_name, "the daemon's name, a non-empty string")
_PRIORITY = optional(one_of(Priority.ALL), "one of " + ", ".join(Priority.ALL),
                     default=Priority.NORMAL)
_TIMEOUT = optional(lambda value: is_number(value, high=MAX_TIMEOUT_S) and value > 0,
                    "a finite, positive number of seconds (at most a year)", default=None)
_MEM = optional(_mem, "a map of memory figures in bytes (non-negative integers or null)")
_ERROR_TEXT = optional(or_none(is_text), "a string or null")
_STATE = required(one_of(DaemonState.ALL), "one of " + ", ".join(DaemonState.ALL))
_TIER = optional(or_none(one_of(Tier.ALL)), "one of " + ", ".join(Tier.ALL) + " or null")
_FACTS = optional(or_none(lambda value: isinstance(value, dict) and is_plain(value)),
                  "a map of plain values (strings, numbers, lists, maps) or null")
_LOADS = optional(or_none(lambda value: is_int(value, 0)), "a non-negative integer")


def _shm_field(value, offer):
    # A message's shared-memory facts (see _shm.py): the segments it brought and
    # their bytes; a call's also its offer to take the reply that way.
    if not isinstance(value, dict):
        return False
    segments = value.get("segments", [])
    return (isinstance(segments, list) and len(segments) <= 64
            and all(_shm.is_name(name) for name in segments)
            and is_int(value.get("bytes", 0), 0)
            and (not offer or (is_text(value.get("token", ""), 64)
                               and or_none(_shm.is_owner)(value.get("owner"))
                               and or_none(_shm.is_tag)(value.get("tag")))))


_SHM_CALL = optional(lambda value: _shm_field(value, True),
                     "a map {token, owner, tag, segments, bytes} (shared memory)")
_SHM_REPLY = optional(lambda value: _shm_field(value, False),
                      "a map {segments: [segment names], bytes} (shared memory)")

# Client -> broker, by `op`.
REQUEST_SCHEMAS = {
    CALL: {"id": _ID, "model": _MODEL,
           "method": required(is_name, "the operation's name, a non-empty string"),
           "args": optional(lambda value: isinstance(value, dict), "a map of argument names "
                            "to values", BadArguments, default={}),
           "priority": _PRIORITY, "timeout": _TIMEOUT,
           "stream": optional(lambda value: isinstance(value, bool), "true or false",
                              default=False),
           "shm": _SHM_CALL},
    CANCEL: {"id": _ID},
    PING: {"id": _ID, "ids": optional(list_of(is_request_id), "a list of request ids",
                                      default=[])},
    PS: {"id": _ID},
    SUPERVISOR: {"id": _ID, "token": required(is_text, "the supervisor's token"),
                 "processes": required(lambda value: isinstance(value, dict) and all(
                     is_name(name) and _process(item) for name, item in value.items()),
                     "a map of daemon names to {status, pid, restarts, error}")},
    LOAD: {"id": _ID, "model": _MODEL, "priority": _PRIORITY, "timeout": _TIMEOUT},
    UNLOAD: {"id": _ID, "model": _MODEL, "priority": _PRIORITY, "timeout": _TIMEOUT},
    PIN: {"id": _ID, "model": _MODEL},
    UNPIN: {"id": _ID, "model": _MODEL},
}

# Daemon -> broker, by `op`.
DAEMON_SCHEMAS = {
    REGISTER: {
        "name": required(is_name, "the daemon's name, a non-empty string"),
        "pid": required(lambda value: is_int(value, 1), "a positive integer"),
        "interpreter": optional(or_none(is_text), "a string"),
        "python": optional(or_none(is_text), "a string"),
        "engine": optional(or_none(is_text), "a string"),
        "methods": optional(list_of(is_name), "a list of operation names"),
        "slots": optional(list_of(is_identity, 1024), "a list of socket identities (bytes)"),
        "state": _STATE, "tier": _TIER,
        "tiers": optional(list_of(one_of(Tier.ALL)), "a list of tiers"),
        "mem": _MEM, "error": _ERROR_TEXT, "facts": _FACTS, "loads": _LOADS,
        "uptime_s": optional(lambda value: is_number(value, 0), "a finite number >= 0"),
        "running": optional(list_of(_running_call), "a list of {id, client, method, slot}"),
        # The daemon's shared-memory directory token (_shm.token_of), null when off.
        "shm": optional(or_none(lambda value: is_text(value, 64)), "a string or null"),
    },
    STATE: {"state": _STATE, "tier": _TIER, "mem": _MEM, "error": _ERROR_TEXT,
            "facts": _FACTS, "loads": _LOADS,
            # The target of a move that failed, as the daemon was asked for it.
            "failed": optional(or_none(is_name), "the tier it failed to reach, or null"),
            "took_s": optional(or_none(lambda value: is_number(value, 0)),
                               "a finite number >= 0 or null")},
    HEARTBEAT: {"state": optional(one_of(DaemonState.ALL), "a daemon state"),
                "running": optional(lambda value: is_int(value, 0), "a non-negative integer"),
                "mem": _MEM},
}

# Daemon -> client through the broker, by `kind`. `value` is never read by the
# broker: it travels to the client as it came.
_REPLY = {"id": _ID, "client": required(is_identity, "the client's identity (bytes)"),
          "mem": _MEM, "shm": _SHM_REPLY}
REPLY_SCHEMAS = {
    PARTIAL: dict(_REPLY, seq=optional(lambda value: is_int(value, 0), "an integer >= 0")),
    PROGRESS: dict(_REPLY, fraction=optional(or_none(lambda value: is_number(value, 0, 1)),
                                             "a number in [0, 1] or null")),
    RESULT: _REPLY,
    ERROR: dict(_REPLY, code=required(is_name, "an error code"),
                message=optional(or_none(is_text), "a string")),
    CANCELLED: dict(_REPLY, message=optional(or_none(is_text), "a string")),
}


def check_request(header):
    return check(header, REQUEST_SCHEMAS, "op")


def check_daemon_message(header):
    return check(header, DAEMON_SCHEMAS, "op")


def check_reply(header):
    return check(header, REPLY_SCHEMAS, "kind")
