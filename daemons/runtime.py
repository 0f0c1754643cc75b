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
- a lifecycle thread runs engine.load() and reports back over inproc.

An operation may call ctx.progress()/ctx.partial() from threads of its own:
sends on a slot socket are serialized by a lock, and the slot thread itself
only touches its socket between calls or under that lock.

Runs on Python 3.7 with only pyzmq and msgpack.
"""

import importlib
import inspect
import logging
import os
import signal
import sys
import threading
import time
import traceback

import zmq

from modelhost import protocol
from modelhost.errors import BadArguments, Cancelled, ModelhostError, error_from_wire

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


_SIGNATURES = {}  # operation function -> (signature, {argument: checked type})
# Under `from __future__ import annotations` an annotation is its source text.
_CHECKED_BY_NAME = {cls.__name__: cls for cls in _CHECKED_TYPES}


def _signature_of(method):
    # inspect.signature costs more than a small call itself: compute it once.
    function = getattr(method, "__func__", method)
    cached = _SIGNATURES.get(function)
    if cached is None:
        signature = inspect.signature(method)
        checked = {}
        for name, parameter in signature.parameters.items():
            annotation = parameter.annotation
            if isinstance(annotation, str):
                annotation = _CHECKED_BY_NAME.get(annotation)
            if annotation in _CHECKED_TYPES:
                checked[name] = annotation
        cached = _SIGNATURES[function] = (signature, checked)
    return cached


def check_arguments(method, ctx, arguments):
    """Bind `arguments` to the operation's signature; BadArguments names what is wrong."""
    if not isinstance(arguments, dict):
        raise BadArguments("arguments must be a map of names to values")
    signature, checked = _signature_of(method)
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


def _identity(name, role):
    # Explicit identities: a restarted broker can route to slots it never saw
    # register, and the replies of calls that outlived the old broker.
    return "{}:{}:{}".format(name, os.getpid(), role).encode()


class Slot(object):
    """One call at a time, on its own socket and thread."""

    def __init__(self, runtime, index):
        self.runtime = runtime
        self.index = index
        self.identity = _identity(runtime.name, "s{}".format(index))
        self.socket = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve, name="slot-{}".format(index),
                                       daemon=True)

    def connect(self, context, endpoint):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, self.identity)
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(endpoint)

    def serve(self):
        runtime = self.runtime
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not runtime.stopping:
            # A bounded wait, so the thread notices a stop.
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
        base = {"id": request_id, "client": client}
        ctx = CallContext(request_id, header.get("method"), bool(header.get("stream")), None)
        seq = [0]
        finished = [False]

        def send(kind, value):
            header = dict(base, kind=kind)
            if kind == protocol.PARTIAL:
                header["seq"] = seq[0]
                seq[0] += 1
                frames = protocol.encode_value_message(header, "value", value)
            else:
                header.update(value)
                frames = protocol.encode(header)
            with self.lock:
                # An engine thread that outlives its call must not speak for it.
                if not finished[0]:
                    protocol.send(self.socket, frames)

        ctx._send = send
        ctx.slot = self.index
        key = (client, request_id)
        with runtime.running_lock:
            runtime.running[key] = ctx
        try:
            frames = self._outcome(ctx, header, payloads, base)
        finally:
            with runtime.running_lock:
                runtime.running.pop(key, None)
        with self.lock:
            finished[0] = True
            protocol.send(self.socket, frames)

    def _outcome(self, ctx, header, payloads, base):
        """The terminal reply's frames; engine exceptions never escape."""
        runtime = self.runtime
        try:
            if runtime.state != protocol.DaemonState.READY:
                raise error_from_wire(
                    "daemon_unavailable", "daemon {} is {}{}".format(
                        runtime.name, runtime.state, ": " + runtime.error if runtime.error else ""))
            method = runtime.operations.get(header.get("method"))
            if method is None:
                raise error_from_wire(
                    "unknown_method", "{} has no method {!r}; it offers: {}".format(
                        runtime.name, header.get("method"), ", ".join(sorted(runtime.operations))))
            arguments = protocol.internalize(header.get("args") or {}, payloads)
            check_arguments(method, ctx, arguments)
            ctx.check_cancelled()
            outcome = method(ctx, **arguments)
            if inspect.isgenerator(outcome):
                outcome = self._drain(ctx, outcome)
            return protocol.encode_value_message(dict(base, kind=protocol.RESULT), "value",
                                                 outcome)
        except Cancelled as exc:
            return protocol.encode(dict(base, kind=protocol.CANCELLED, message=exc.message))
        except ModelhostError as exc:
            return protocol.encode(dict(base, **protocol.error_header(
                ctx.request_id, exc.code, exc.message, exc.details)))
        except Exception as exc:
            log.error("rid=%s %s raised %s: %s\n%s", ctx.request_id, ctx.method,
                      type(exc).__name__, exc, traceback.format_exc())
            return protocol.encode(dict(base, **protocol.error_header(
                ctx.request_id, "engine_error",
                "{} raised {}: {}".format(ctx.method, type(exc).__name__, exc),
                {"type": type(exc).__name__})))

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
        self.liveness = int(spec.get("liveness", protocol.LIVENESS))
        self.parent_pid = spec.get("parent_pid")
        self.started = time.monotonic()
        self.operations = operations_of(engine) if engine is not None else {}
        if engine_error is not None:
            self.state, self.error = protocol.DaemonState.FAILED, engine_error
        else:
            self.state, self.error = protocol.DaemonState.LOADING, None
        self.loads = 0
        self.facts = {}
        # (client, request id) -> CallContext, for cancellation and re-registration.
        self.running = {}
        self.running_lock = threading.Lock()
        self.stopping = False
        self.context = zmq.Context.instance()
        self.slots = [Slot(self, index) for index in range(int(spec.get("concurrency", 1)))]

    def _load(self):
        """engine.load() off the main thread; the outcome goes back over inproc."""
        push = self.context.socket(zmq.PUSH)
        push.connect(_LIFECYCLE_ENDPOINT)
        try:
            self.engine.load()
            self.loads += 1
            update = {"state": protocol.DaemonState.READY, "facts": self.engine.describe() or {}}
        except Exception as exc:
            log.error("load failed: %s\n%s", exc, traceback.format_exc())
            update = {"state": protocol.DaemonState.FAILED,
                      "error": "load failed: {}: {}".format(type(exc).__name__, exc)}
        push.send(protocol.encode(update)[0])
        push.close(linger=1000)

    # --- main thread: the control socket ------------------------------------

    def _send(self, header):
        protocol.send(self.control, protocol.encode(header))

    def _register(self):
        with self.running_lock:
            running = [{"id": ctx.request_id, "client": client, "method": ctx.method,
                        "slot": ctx.slot} for (client, _), ctx in self.running.items()]
        self._send({
            "op": protocol.REGISTER,
            "name": self.name,
            "pid": os.getpid(),
            "interpreter": protocol.interpreter_description(),
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "engine": self.spec.get("engine"),
            "methods": sorted(self.operations),
            "slots": [slot.identity for slot in self.slots],
            "state": self.state,
            "error": self.error,
            "facts": self.facts,
            "loads": self.loads,
            "uptime_s": time.monotonic() - self.started,
            "running": running,
        })

    def _on_control(self, frames):
        try:
            header, _ = protocol.decode(frames)
        except ModelhostError as exc:
            log.error("dropped a message from the broker: %s", exc)
            return
        op = header.get("op")
        if op == protocol.CANCEL:
            with self.running_lock:
                ctx = self.running.get((header.get("client"), header.get("id")))
            if ctx is not None:
                ctx.cancel()
        elif op == protocol.REREGISTER:
            log.info("the broker asked this daemon to register again")
            self._register()
        elif op != protocol.HEARTBEAT:
            log.warning("ignored unknown command %r from the broker", op)

    def _on_lifecycle(self, frame):
        update = protocol.decode_header(frame)
        self.state = update["state"]
        self.error = update.get("error")
        self.facts = update.get("facts", self.facts)
        log.info("state %s%s", self.state, ": " + self.error if self.error else "")
        self._send({"op": protocol.STATE, "state": self.state, "error": self.error,
                    "facts": self.facts, "loads": self.loads})

    def _parent_gone(self):
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self):
        """Serve until SIGTERM or until the supervising parent dies; returns the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        lifecycle = self.context.socket(zmq.PULL)
        lifecycle.bind(_LIFECYCLE_ENDPOINT)
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.ROUTING_ID, _identity(self.name, "control"))
        self.control.setsockopt(zmq.LINGER, 1000)
        self.control.connect(self.spec["backend"])
        for slot in self.slots:
            slot.connect(self.context, self.spec["backend"])
            slot.thread.start()
        if self.state == protocol.DaemonState.LOADING:
            threading.Thread(target=self._load, daemon=True).start()

        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(lifecycle, zmq.POLLIN)
        self._register()
        broker_seen = time.monotonic()
        broker_lost = False
        next_heartbeat = time.monotonic() + self.heartbeat_s
        while not self.stopping:
            timeout_ms = max(0, (next_heartbeat - time.monotonic()) * 1000)
            events = dict(poller.poll(timeout_ms))
            if lifecycle in events:
                self._on_lifecycle(lifecycle.recv())
            if self.control in events:
                while protocol.readable(self.control):
                    frames = protocol.recv(self.control)
                    broker_seen = time.monotonic()
                    if broker_lost:
                        log.info("the broker is back")
                        broker_lost = False
                    self._on_control(frames)
            now = time.monotonic()
            if now >= next_heartbeat:
                next_heartbeat = now + self.heartbeat_s
                if self._parent_gone():
                    log.error("the supervising process %s is gone; exiting so no memory is "
                              "held by an orphan", self.parent_pid)
                    break
                if now - broker_seen > self.heartbeat_s * self.liveness:
                    if not broker_lost:
                        log.warning("no word from the broker for %.1fs; registering again "
                                    "when it answers", now - broker_seen)
                        broker_lost = True
                    # ZeroMQ reconnects by itself; a register is what a
                    # restarted broker needs to know us, weights still loaded.
                    self._register()
                    broker_seen = now
                else:
                    with self.running_lock:
                        running = len(self.running)
                    self._send({"op": protocol.HEARTBEAT, "state": self.state,
                                "running": running})
        self._shutdown()
        return 0

    def _on_signal(self, signum, frame):
        self.stopping = True

    def _shutdown(self):
        self.stopping = True
        with self.running_lock:
            for ctx in self.running.values():
                ctx.cancel()
        for slot in self.slots:
            slot.thread.join(2.0)
        if self.engine is not None and self.state == protocol.DaemonState.READY:
            try:
                self.engine.unload()
            except Exception as exc:
                log.warning("unload at exit failed: %s", exc)
        log.info("stopped")
