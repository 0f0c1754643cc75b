"""The daemon runtime: one engine, one control socket, one socket per call slot.

Threads and sockets, and why:
- the main thread owns the *control* DEALER: registration, heartbeats both
  ways, cancellations, state changes, the parent watch. It never runs engine
  code, so a daemon stays visibly alive through a minute-long load or call.
- each of the `concurrency` *slot* threads owns a DEALER of its own. The
  broker sends a call to a free slot's socket, and the slot thread runs the
  operation right there and sends its chunks and result on the same socket:
  no thread handoff on the hot path, and no socket shared between threads
  (ZeroMQ sockets are not thread-safe).
- a *lifecycle* thread moves the engine between memory tiers when the broker
  says so ({"op": "tier"} on the control socket): load(), offload(),
  onload(), unload(), one at a time in arrival order, and reports each start
  and end over inproc to the main thread, which sends them as `state`
  messages. The daemon starts unloaded: the broker decides when to load,
  because it knows what else wants the device.

Tiers and states: resident (READY: calls are served), offloaded (OFFLOADED),
unloaded (UNLOADED, or FAILED after a failed load). While a transition runs
the state is LOADING, ONLOADING, OFFLOADING or UNLOADING and calls are
refused with daemon_unavailable; a downward transition first waits for the
running calls to end. A failed offload/onload/unload leaves the daemon at
its tier with `error` and `failed` (the target) set, so the broker can
escalate, e.g. to stopping the process.

Memory reports ("mem": rss, rss_peak, cuda, cuda_peak) travel with register,
state and heartbeat messages; every terminal reply carries the call's peaks
(rss_peak, cuda_peak), reset when a call starts with no other call running.
They are the daemon's own view; the broker's probe has the last word.

An operation may call ctx.progress()/ctx.partial() from threads of its own:
sends on a slot socket are serialized by a lock, and the slot thread itself
only touches its socket between calls or under that lock.

Runs on Python 3.7 with only pyzmq and msgpack.

Its length (about 790 lines): the control loop, the slot threads and the lifecycle
thread share one socket protocol and one set of locks; split, their invariants
(who may touch which socket, when a kept reply is resent) would span modules.
The argument check (_Signature, check_arguments) is the part that could leave.
"""

import collections
import gc
import importlib
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

import zmq

from modelhost import _shm, local, protocol
from modelhost.errors import (BadArguments, Cancelled, EngineError, ModelhostError,
                              PayloadTooLarge, error_from_wire)

from .engine import CallContext, operations_of

log = logging.getLogger("modelhost.daemon")

_LIFECYCLE_ENDPOINT = "inproc://modelhost-lifecycle"

# Annotations checked against argument types before a call reaches the engine.
# Anything fancier (Optional, numpy arrays, ...) is left to the engine.
_CHECKED_TYPES = (int, float, str, bool, bytes, list, dict)


def import_engine(path):
    """The engine class named 'package.module:Class'."""
    module_name, _, class_name = path.partition(":")
    if not class_name:
        raise ImportError("engine {!r} must name a class as 'package.module:Class'".format(path))
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ImportError("module {} has no class {}".format(module_name, class_name))


_SIGNATURES = {}  # operation function -> _Signature
# Under `from __future__ import annotations` an annotation is its source text.
_CHECKED_BY_NAME = {cls.__name__: cls for cls in _CHECKED_TYPES}
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class _Signature(object):
    """What check_arguments needs of an operation's signature, computed once.

    inspect.signature costs more than a small call itself, and so does
    Signature.bind: for the usual signature (ctx, then arguments by name),
    `names` and `needed` decide the same as bind would, and bind runs only
    to word the error of arguments that do not fit, or for a signature
    (positional-only or *args after ctx) that the sets cannot describe.
    """

    __slots__ = ("signature", "checked", "names", "needed", "any_name", "first")

    def __init__(self, method):
        self.signature = signature = inspect.signature(method)
        self.checked = {}  # argument -> its annotation among _CHECKED_TYPES
        for name, parameter in signature.parameters.items():
            annotation = parameter.annotation
            if isinstance(annotation, str):
                annotation = _CHECKED_BY_NAME.get(annotation)
            if annotation in _CHECKED_TYPES:
                self.checked[name] = annotation
        parameters = list(signature.parameters.values())
        rest = parameters[1:]
        self.first = parameters[0].name if parameters else None  # ctx's name
        self.any_name = any(p.kind == p.VAR_KEYWORD for p in rest)  # **kwargs
        if not parameters or parameters[0].kind not in (
                inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
                or any(p.kind not in _BY_KEYWORD + (p.VAR_KEYWORD,) for p in rest):
            self.names = self.needed = None  # only bind can tell
        else:
            self.names = frozenset(p.name for p in rest if p.kind in _BY_KEYWORD)
            self.needed = frozenset(p.name for p in rest
                                    if p.kind in _BY_KEYWORD and p.default is p.empty)

    def fits(self, arguments):
        """Whether bind(ctx, **arguments) would succeed; None when only bind can tell."""
        if self.names is None:
            return None
        keys = arguments.keys()
        return self.needed <= keys and (keys <= self.names if not self.any_name
                                        else self.first not in keys)


def _signature_of(method):
    function = getattr(method, "__func__", method)
    cached = _SIGNATURES.get(function)
    if cached is None:
        cached = _SIGNATURES[function] = _Signature(method)
    return cached


def check_arguments(method, ctx, arguments):
    """Bind `arguments` to the operation's signature; BadArguments names what is wrong."""
    if not isinstance(arguments, dict):
        raise BadArguments("arguments must be a map of names to values")
    cached = _signature_of(method)
    signature, checked = cached.signature, cached.checked
    if not cached.fits(arguments):
        try:
            signature.bind(ctx, **arguments)
        except TypeError as exc:
            accepted = [name for name in list(signature.parameters)[1:]]
            raise BadArguments("{}: {} (accepted arguments: {})".format(
                method.__name__, exc, ", ".join(accepted) or "none"))
    for name, expected in checked.items():
        if name not in arguments:
            continue
        value = arguments[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if expected is int and isinstance(value, bool):
            ok = False
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise BadArguments("{}: argument '{}' must be {}, not {}".format(
                method.__name__, name, expected.__name__, type(value).__name__))


# --- memory, as this process sees it ----------------------------------------------


def _cuda():
    """torch.cuda when an engine has initialized CUDA, else None; never imports torch.

    A daemon that does not use torch must not pay its import (seconds, and
    memory) for a report; one that does has it in sys.modules already.
    """
    cuda = getattr(sys.modules.get("torch"), "cuda", None)  # None also while torch imports
    try:
        # is_initialized() first: it is the cheap check, and false on CPU daemons.
        if cuda is not None and cuda.is_initialized() and cuda.is_available():
            return cuda
    except Exception:
        pass
    return None


def _cuda_sum(read):
    cuda = _cuda()
    if cuda is None:
        return None
    try:
        return sum(read(cuda, index) for index in range(cuda.device_count()))
    except Exception:
        return None


def _open_proc(name, flags):
    try:
        return os.open("/proc/self/" + name, flags)
    except OSError:
        return None


class MemoryMeter(object):
    """Resident set, its high-water mark, and CUDA memory of this process, cheaply.

    The /proc files stay open: a pread() on an open file costs a few
    microseconds, an open() more than the read, and this runs on every call.
    procfs regenerates the text on each read from offset 0.
    """

    def __init__(self):
        self._statm = _open_proc("statm", os.O_RDONLY)
        self._status = _open_proc("status", os.O_RDONLY)
        self._clear_refs = _open_proc("clear_refs", os.O_WRONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        if self._statm is None:
            return None
        try:
            return int(os.pread(self._statm, 256, 0).split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def rss_peak(self):
        """VmHWM: the most this process had resident since the last reset_peaks()."""
        if self._status is None:
            return None
        try:
            text = os.pread(self._status, 4096, 0)
            start = text.index(b"VmHWM:") + 6
            return int(text[start:text.index(b"kB", start)]) * 1024
        except (OSError, ValueError):
            return None

    def reset_peaks(self):
        if self._clear_refs is not None:
            try:
                os.write(self._clear_refs, b"5")  # 5: reset VmHWM to the current RSS (Linux)
            except OSError:
                pass
        cuda = _cuda()
        if cuda is not None:
            try:
                for index in range(cuda.device_count()):
                    cuda.reset_peak_memory_stats(index)
            except Exception:
                pass

    def report(self):
        """The "mem" map of register, state and heartbeat messages (bytes, None if unknown)."""
        return {"rss": self.rss(), "rss_peak": self.rss_peak(),
                "cuda": _cuda_sum(lambda cuda, index: cuda.memory_reserved(index)),
                "cuda_peak": _cuda_sum(lambda cuda, index: cuda.max_memory_reserved(index))}

    def call_peaks(self):
        """The "mem" map of a terminal reply: peaks since the call (or its overlap) began."""
        return {"rss_peak": self.rss_peak(),
                "cuda_peak": _cuda_sum(lambda cuda, index: cuda.max_memory_reserved(index))}


def release_memory():
    """Hand what an offload or unload freed back to the OS, so the broker's probe sees it.

    Cycles keep tensors alive until collected; torch's caching allocator keeps
    freed blocks reserved on the device; glibc keeps freed heap below the mmap
    threshold mapped. Each step is best effort.
    """
    gc.collect()
    cuda = _cuda()
    if cuda is not None:
        try:
            cuda.empty_cache()
        except Exception as exc:
            log.warning("torch.cuda.empty_cache() failed: %s", exc)
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)  # the process's own libc; absent on musl
    except (ImportError, OSError, AttributeError):
        pass


# --- tiers -------------------------------------------------------------------------

Tier = protocol.Tier
State = protocol.DaemonState

# The engine method that makes a move, by the state the daemon shows while it
# runs (protocol.MOVING_STATE: which moves there are).
_HOOKS = {State.LOADING: "load", State.ONLOADING: "onload", State.OFFLOADING: "offload",
          State.UNLOADING: "unload"}
_DOWNWARD = ("offload", "unload")


def can_offload(engine):
    """Whether the engine's class defines both offload() and onload() (Engine has neither)."""
    return all(callable(getattr(type(engine), name, None)) for name in ("offload", "onload"))


def tiers_of(engine):
    """The tiers a daemon can be asked for, most memory first."""
    if engine is not None and can_offload(engine):
        return [Tier.RESIDENT, Tier.OFFLOADED, Tier.UNLOADED]
    return [Tier.RESIDENT, Tier.UNLOADED]


def _identity(name, role):
    # Explicit identities: a restarted broker can route to slots it never saw
    # register, and the replies of calls that outlived the old broker.
    return "{}:{}:{}".format(name, os.getpid(), role).encode()


# Terminal replies kept per slot for a resend to a restarted broker: a reply
# sent just before the broker died, or into a connection that ZeroMQ had not
# yet seen close, is gone otherwise, and with it work that was done.
KEPT_REPLIES = 16
KEPT_REPLY_BYTES = 64 * 2**20


def _curve_client(socket, endpoint, spec):
    """A CURVE client of a tcp backend when the spec says how (its "curve": the
    broker's public key file and this daemon's key_secret; see daemon_spec)."""
    curve = spec.get("curve")
    if not curve or not endpoint.startswith("tcp://"):
        return
    import zmq.auth

    socket.setsockopt(zmq.CURVE_SERVERKEY, zmq.auth.load_certificate(curve["server_key"])[0])
    public, secret = zmq.auth.load_certificate(curve["client_key"])
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)


class Slot(object):
    """One call at a time, on its own socket and thread."""

    def __init__(self, runtime, index):
        self.runtime = runtime
        self.index = index
        self.identity = _identity(runtime.name, "s{}".format(index))
        self.socket = None
        self.lock = threading.Lock()
        # (sent at, frames) of recent terminal replies, until the broker has
        # been heard from for a whole liveness after them.
        self.kept = collections.deque()
        self.resent_epoch = 0
        self.thread = threading.Thread(target=self.serve, name="slot-{}".format(index),
                                       daemon=True)

    def connect(self, context, endpoint):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self.socket.setsockopt(zmq.LINGER, 1000)
        _curve_client(self.socket, endpoint, self.runtime.spec)
        self.socket.connect(endpoint)

    def serve(self):
        runtime = self.runtime
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not runtime.stopping:
            if self.resent_epoch != runtime.register_epoch:
                self.resent_epoch = runtime.register_epoch
                self._resend_kept()
            # A bounded wait, so the thread notices a stop and a re-registration.
            if not poller.poll(200):
                continue
            with self.lock:
                frames = protocol.recv(self.socket)
            try:
                header, payloads = protocol.decode(frames)
            except ModelhostError as exc:
                log.error("dropped a message from the broker: %s", exc)
                continue
            if header.get("op") == protocol.CALL:
                self.run_call(header, payloads)
            elif header.get("op") != protocol.HEARTBEAT:
                log.warning("slot %d ignored command %r", self.index, header.get("op"))

    def run_call(self, header, payloads):
        runtime = self.runtime
        request_id, client = header.get("id"), header.get("client")
        ctx = CallContext(request_id, header.get("method"), bool(header.get("stream")), None)
        seq = [0]
        finished = [False]

        def send(kind, value):
            writer = None
            if kind == protocol.PARTIAL:
                writer = runtime.reply_writer(header)
                frames = protocol.partial_reply(request_id, client, seq[0], value, writer)
                seq[0] += 1
            else:
                frames = protocol.progress_reply(request_id, client, value["fraction"],
                                                 value["stage"], value["message"])
            runtime.check_reply_size(frames, writer)
            with self.lock:
                # An engine thread that outlives its call must not speak for it.
                if not finished[0]:
                    protocol.send(self.socket, frames)
                elif writer is not None:
                    writer.discard()  # nor leave its chunk's segment behind

        ctx._send = send
        ctx.slot = self.index
        key = (client, request_id)
        with runtime.running_lock:
            # Peaks are per call only for a call that runs alone; one that
            # overlaps others shares their peaks.
            alone = not runtime.running
            runtime.running[key] = ctx
        try:
            frames = self._outcome(ctx, header, payloads, client, alone)
        finally:
            with runtime.running_lock:
                runtime.running.pop(key, None)
        with self.lock:
            finished[0] = True
            protocol.send(self.socket, frames)
            self._keep(frames)

    def _keep(self, frames):
        """Remember a terminal reply (under self.lock) for a resend after a broker restart."""
        kept = self.kept
        # What was sent a whole liveness before the broker was last heard has reached it.
        confirmed = self.runtime.broker_seen - self.runtime.heartbeat_s * self.runtime.liveness
        while kept and (kept[0][0] < confirmed or len(kept) >= KEPT_REPLIES):
            kept.popleft()
        if sum(len(frame) for frame in frames) <= KEPT_REPLY_BYTES:
            kept.append((time.monotonic(), frames))

    def _resend_kept(self):
        """After a (re-)registration: send again the replies a dead broker may have lost.

        A reply that did arrive before is harmless twice: the broker forwards a
        reply for a call it does not know, and the client drops one for an id
        it no longer waits for.
        """
        with self.lock:
            for _, frames in self.kept:
                protocol.send(self.socket, frames)
            if self.kept:
                log.info("slot %d sent %d recent results again for the broker that came back",
                         self.index, len(self.kept))

    def _outcome(self, ctx, header, payloads, client, alone):
        """The terminal reply's frames, with the call's memory peaks; engine exceptions never escape."""
        runtime = self.runtime
        memory = runtime.memory
        try:
            # READY only at tier resident; a transition sets another state
            # before it waits for the running calls, so none starts under it.
            if runtime.state != protocol.DaemonState.READY:
                raise error_from_wire(
                    "daemon_unavailable", "daemon {} is {}{}".format(
                        runtime.name, runtime.state, ": " + runtime.error if runtime.error else ""))
            if alone:
                memory.reset_peaks()
            method = runtime.operations.get(header.get("method"))
            if method is None:
                raise error_from_wire(
                    "unknown_method", "{} has no method {!r}; it offers: {}".format(
                        runtime.name, header.get("method"), ", ".join(sorted(runtime.operations))))
            arguments = protocol.internalize(
                header.get("args") or {}, payloads,
                # What came in shared memory is this daemon's once mapped: unlinked at once.
                # Only the segments the call lists: the broker strips the list from a call
                # that did not come from this host.
                None if runtime.shm is None else runtime.shm.reader(
                    True, (header.get("shm") or {}).get("segments") or ()))
            check_arguments(method, ctx, arguments)
            ctx.check_cancelled()
            outcome = method(ctx, **arguments)
            if inspect.isgenerator(outcome):
                outcome = self._drain(ctx, outcome)
            writer = runtime.reply_writer(header)
            frames = protocol.result_reply(ctx.request_id, outcome, client, memory.call_peaks(),
                                           writer)
            runtime.check_reply_size(frames, writer)
            return frames
        except Cancelled as exc:
            return protocol.cancelled_reply(ctx.request_id, exc.message, client,
                                            memory.call_peaks())
        except ModelhostError as exc:
            return protocol.error_reply(ctx.request_id, exc, client, memory.call_peaks())
        except Exception as exc:
            log.error("rid=%s %s raised %s: %s\n%s", ctx.request_id, ctx.method,
                      type(exc).__name__, exc, traceback.format_exc())
            return protocol.error_reply(ctx.request_id, EngineError(
                "{} raised {}: {}".format(ctx.method, type(exc).__name__, exc),
                {"type": type(exc).__name__}), client, memory.call_peaks())

    @staticmethod
    def _drain(ctx, generator):
        try:
            while True:
                ctx.check_cancelled()
                try:
                    chunk = next(generator)
                except StopIteration as stop:
                    return stop.value
                ctx.partial(chunk)
        finally:
            generator.close()


class Runtime(object):
    def __init__(self, spec, engine=None, engine_error=None):
        self.name = spec["name"]
        self.spec = spec
        self.engine = engine
        self.heartbeat_s = float(spec.get("heartbeat_s", protocol.HEARTBEAT_S))
        # The broker drops a daemon's connection over a frame larger than this:
        # a call's reply is checked first and answered payload_too_large.
        self.max_reply_bytes = spec.get("max_reply_bytes")
        self.liveness = int(spec.get("liveness", protocol.LIVENESS))
        self.parent_pid = spec.get("parent_pid")
        self.started = time.monotonic()
        self.operations = operations_of(engine) if engine is not None else {}
        self.tiers = tiers_of(engine)
        # state, tier and error change on the lifecycle thread only.
        self.tier = Tier.UNLOADED
        if engine_error is not None:
            self.state, self.error = State.FAILED, engine_error
        else:
            self.state, self.error = State.UNLOADED, None
        self.loads = 0
        self.facts = {}
        self.memory = MemoryMeter()
        # Target tiers from the broker, served in arrival order by one thread.
        self.transitions = queue.Queue()
        # Held through each transition, so that shutdown never unloads under one.
        self.lifecycle_lock = threading.Lock()
        # (client, request id) -> CallContext, for cancellation and re-registration.
        self.running = {}
        self.running_lock = threading.Lock()
        self.stopping = False
        # When the broker last said anything (main thread writes, slots read).
        self.broker_seen = time.monotonic()
        # Counts the times a broker came back (or a restarted one asked us to
        # register): each asks the slots to resend what they kept.
        self.register_epoch = 0
        # Shared memory for large payloads (None: off): where, from what size, how much.
        self.shm = _shm.Segments.from_spec(spec.get("shm"))
        self.context = zmq.Context.instance()
        self.slots = [Slot(self, index) for index in range(int(spec.get("concurrency", 1)))]

    def reply_writer(self, call):
        """A shared-memory Writer for the large values of a reply to `call`, when its caller
        offered to take them so and shares this daemon's segment directory; else None."""
        offer = call.get("shm")
        if self.shm is None or not isinstance(offer, dict) or not (
                _shm.is_owner(offer.get("owner")) and _shm.is_tag(offer.get("tag"))):
            return None
        if offer.get("token") != self.shm.token:
            _shm.say_once("peer", logging.INFO, "large results to some clients travel as "
                          "frames: they do not share this daemon's shared-memory directory %s",
                          self.shm.directory)
            return None
        return self.shm.writer(offer["owner"], offer["tag"])

    def check_reply_size(self, frames, writer=None):
        """PayloadTooLarge unless every frame fits what the broker accepts from a daemon
        (and then the segment the reply's `writer` made is unlinked)."""
        limit = self.max_reply_bytes
        largest = max(len(frame) for frame in frames)
        if limit is not None and largest > limit:
            if writer is not None:
                writer.discard()
            raise PayloadTooLarge(
                "the reply carries a frame of {} bytes; the broker accepts at most {} from a "
                "daemon (broker.max_reply in its configuration)".format(largest, limit))

    # --- lifecycle thread: tier transitions ---------------------------------

    def _lifecycle(self):
        """Run the transitions the broker asks for; their reports go back over inproc."""
        push = self.context.socket(zmq.PUSH)
        push.connect(_LIFECYCLE_ENDPOINT)

        def report(frames):
            push.send(frames[0])

        try:
            while True:
                target = self.transitions.get()
                with self.lifecycle_lock:
                    if self.stopping:
                        break
                    report(self._transition(target, report))
        finally:
            push.close(linger=1000)

    def _state_message(self, took_s=None, failed=None):
        return protocol.state_message(state=self.state, tier=self.tier, took_s=took_s,
                                      mem=self.memory.report(), loads=self.loads,
                                      facts=self.facts, error=self.error, failed=failed)

    def _transition(self, target, report):
        """Move the engine to tier `target`; returns the final state message's frames."""
        started = time.monotonic()
        current = self.tier
        if target == current:
            return self._state_message(took_s=0.0)
        moving = protocol.MOVING_STATE.get((current, target))
        step = _HOOKS.get(moving)
        try:
            if self.engine is None:
                raise RuntimeError(self.error)  # the engine could not even be created
            if step is None:
                raise ValueError("no move from tier {} to {!r}; the daemon moves between {}".format(
                    current, target, ", ".join(self.tiers)))
            if step in ("offload", "onload") and not can_offload(self.engine):
                raise NotImplementedError("engine {} has no offload()/onload(); its tiers are "
                                          "{}".format(self.spec.get("engine"),
                                                      ", ".join(self.tiers)))
        except Exception as exc:
            return self._failed(step or "tier", target, exc, started)

        with self.running_lock:
            # From here on calls are refused; the ones already running are
            # waited for before weights move away under them.
            self.state, self.error = moving, None
        report(self._state_message())
        log.info("%s: %s -> %s", step, current, target)
        if step in _DOWNWARD:
            self._wait_idle()
        try:
            getattr(self.engine, step)()
        except Exception as exc:
            log.error("%s failed: %s\n%s", step, exc, traceback.format_exc())
            return self._failed(step, target, exc, started)
        if step == "load":
            self.loads += 1
            try:
                self.facts = self.engine.describe() or {}
            except Exception as exc:
                log.warning("describe() failed: %s", exc)
        if step in _DOWNWARD:
            try:
                release_memory()
            except Exception as exc:
                log.warning("releasing memory after %s failed: %s", step, exc)
        self.tier, self.state = target, protocol.STATE_OF_TIER[target]
        return self._state_message(took_s=time.monotonic() - started)

    def _failed(self, step, target, exc, started):
        self.error = "{} failed: {}: {}".format(step, type(exc).__name__, exc)
        failed = target
        if step == "load":
            # A load that raised leaves the weights in an unknown state; FAILED
            # shows why, and a later {"tier": "resident"} tries again.
            self.state, self.tier, failed = State.FAILED, Tier.UNLOADED, None
        elif self.state != State.FAILED:
            self.state = protocol.STATE_OF_TIER[self.tier]
        log.error("%s", self.error)
        return self._state_message(took_s=time.monotonic() - started, failed=failed)

    def _wait_idle(self):
        # The broker does not move a busy daemon down; this covers a call
        # that was dispatched just before the command.
        while True:
            with self.running_lock:
                if not self.running:
                    return
            time.sleep(0.01)

    # --- main thread: the control socket ------------------------------------

    def _send(self, frames):
        protocol.send(self.control, frames)

    def _register(self):
        with self.running_lock:
            running = [{"id": ctx.request_id, "client": client, "method": ctx.method,
                        "slot": ctx.slot} for (client, _), ctx in self.running.items()]
        self._send(protocol.register_message(
            name=self.name,
            pid=os.getpid(),
            interpreter=local.interpreter_description(),
            python="{}.{}.{}".format(*sys.version_info[:3]),
            engine=self.spec.get("engine"),
            methods=sorted(self.operations),
            slots=[slot.identity for slot in self.slots],
            state=self.state,
            tier=self.tier,
            tiers=self.tiers,
            mem=self.memory.report(),
            error=self.error,
            facts=self.facts,
            loads=self.loads,
            uptime_s=time.monotonic() - self.started,
            running=running,
            shm=None if self.shm is None else self.shm.token,
        ))

    def _on_control(self, frames):
        try:
            header, _ = protocol.decode(frames)
        except ModelhostError as exc:
            log.error("dropped a message from the broker: %s", exc)
            return
        op = header.get("op")
        if header.get("kind") == protocol.ERROR:
            # The broker refused something of ours (a registration under a name
            # that a live process holds): say so where people look.
            log.error("the broker refused this daemon: %s", header.get("message"))
        elif op == protocol.CANCEL:
            with self.running_lock:
                ctx = self.running.get((header.get("client"), header.get("id")))
            if ctx is not None:
                log.debug("rid=%s cancel asked by the broker", header.get("id"))
                ctx.cancel()
        elif op == protocol.TIER:
            log.info("the broker asked for tier %s", header.get("tier"))
            self.transitions.put(header.get("tier"))
        elif op == protocol.REREGISTER:
            log.info("the broker asked this daemon to register again")
            self._register()
            self.register_epoch += 1
        elif op != protocol.HEARTBEAT:
            log.warning("ignored unknown command %r from the broker", op)

    def _on_lifecycle(self, frame):
        # The lifecycle thread built the state message; this thread owns the socket.
        message = protocol.decode_header(frame)
        log.info("state %s, tier %s%s", message["state"], message["tier"],
                 ": " + message["error"] if message.get("error") else "")
        self._send([frame])

    def _parent_gone(self):
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self):
        """Serve until SIGTERM or until the supervising parent dies; returns the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if self.shm is not None and self.shm.token is None:
            log.warning("large payloads travel as frames: the shared-memory directory %s is "
                        "not usable", self.shm.directory)
        elif self.shm is not None:
            self.shm.sweep()  # what processes that died before us left behind
            log.info("large payloads in shared memory: %s, from %s bytes", self.shm.directory,
                     self.shm.threshold)
        lifecycle = self.context.socket(zmq.PULL)
        lifecycle.bind(_LIFECYCLE_ENDPOINT)
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.ROUTING_ID, _identity(self.name, "control"))
        self.control.setsockopt(zmq.LINGER, 1000)
        _curve_client(self.control, self.spec["backend"], self.spec)
        self.control.connect(self.spec["backend"])
        for slot in self.slots:
            slot.connect(self.context, self.spec["backend"])
            slot.thread.start()
        threading.Thread(target=self._lifecycle, name="lifecycle", daemon=True).start()

        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(lifecycle, zmq.POLLIN)
        self._register()
        self.broker_seen = time.monotonic()
        broker_lost = False
        next_heartbeat = time.monotonic() + self.heartbeat_s
        while not self.stopping:
            timeout_ms = max(0, (next_heartbeat - time.monotonic()) * 1000)
            events = dict(poller.poll(timeout_ms))
            if lifecycle in events:
                while protocol.readable(lifecycle):
                    self._on_lifecycle(lifecycle.recv())
            if self.control in events:
                while protocol.readable(self.control):
                    frames = protocol.recv(self.control)
                    self.broker_seen = time.monotonic()
                    if broker_lost:
                        log.info("the broker is back")
                        broker_lost = False
                        self.register_epoch += 1  # the slots resend on a live connection
                    self._on_control(frames)
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_s
                if self._parent_gone():
                    log.error("the supervising process %s is gone; exiting so no memory is "
                              "held by an orphan", self.parent_pid)
                    break
                if now - self.broker_seen > self.heartbeat_s * self.liveness:
                    if not broker_lost:
                        log.warning("no word from the broker for %.1fs; registering again "
                                    "when it answers", now - self.broker_seen)
                        broker_lost = True
                    # ZeroMQ reconnects by itself; a register is what a
                    # restarted broker needs to know us, weights still loaded.
                    self._register()
                    self.broker_seen = now
                else:
                    with self.running_lock:
                        running = len(self.running)
                    self._send(protocol.heartbeat_message(self.state, running,
                                                          self.memory.report()))
                if self.shm is not None:
                    self.shm.trim()  # reusable segments left unused for a while
        self._shutdown()
        return 0

    def _on_signal(self, signum, frame):
        self.stopping = True

    def _shutdown(self):
        self.stopping = True
        self.transitions.put(None)  # wakes the lifecycle thread, which sees `stopping`
        with self.running_lock:
            for ctx in self.running.values():
                ctx.cancel()
        for slot in self.slots:
            slot.thread.join(2.0)
        # Not waiting out a transition in flight (a load may take minutes);
        # the process exit frees its memory anyway.
        if not self.lifecycle_lock.acquire(False):
            log.warning("exiting during %s; the engine is not unloaded first", self.state)
        else:
            try:
                if self.engine is not None and self.tier in (Tier.RESIDENT, Tier.OFFLOADED):
                    self.engine.unload()
            except Exception as exc:
                log.warning("unload at exit failed: %s", exc)
            finally:
                self.lifecycle_lock.release()
        log.info("stopped")
