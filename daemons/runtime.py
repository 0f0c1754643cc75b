"""The daemon runtime: one engine behind one DEALER socket to the broker.

Threads, and why:
- the main thread owns the broker socket. It polls, answers heartbeats,
  receives calls and cancellations, and forwards what workers produce. It
  never runs engine code, so a daemon stays responsive (and visibly alive)
  during a minute-long load or call.
- a lifecycle thread runs engine.load() / unload().
- `concurrency` worker threads run operations.
Threads other than the main one never touch the broker socket: each has its
own inproc PUSH socket to the main thread, and marks each message with a tag
so the main thread knows when a call or a load is over.

Runs on Python 3.7 with only pyzmq and msgpack.
"""

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

from modelhost import protocol
from modelhost.errors import BadArguments, Cancelled, ModelhostError

from .engine import CallContext, operations_of

log = logging.getLogger("modelhost.daemon")

_WORKER_ENDPOINT = "inproc://modelhost-daemon-out"

# Tags on messages from the lifecycle and worker threads to the main thread.
_TAG_FORWARD = b"F"  # forward to the broker; the call goes on
_TAG_TERMINAL = b"T"  # forward to the broker; the call is over
_TAG_STATE = b"S"  # the engine's state changed (load or unload finished)

# Annotations checked against argument types before a call reaches the engine.
# Anything fancier (Optional, numpy arrays, ...) is left to the engine.
_CHECKED_TYPES = (int, float, str, bool, bytes, list, dict)


def import_engine(path):
    """The engine class named 'package.module:Class'."""
    module_name, _, class_name = path.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ImportError("module {} has no class {}".format(module_name, class_name))


def check_arguments(method, ctx, arguments):
    """Bind `arguments` to the operation's signature; BadArguments names what is wrong."""
    if not isinstance(arguments, dict):
        raise BadArguments("arguments must be a map of names to values")
    signature = inspect.signature(method)
    try:
        bound = signature.bind(ctx, **arguments)
    except TypeError as exc:
        accepted = [name for name in list(signature.parameters)[1:]]
        raise BadArguments("{}: {} (accepted arguments: {})".format(
            method.__name__, exc, ", ".join(accepted) or "none"))
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        expected = parameter.annotation
        if expected not in _CHECKED_TYPES or name not in arguments:
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if expected is int and isinstance(value, bool):
            ok = False
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise BadArguments("{}: argument '{}' must be {}, not {}".format(
                method.__name__, name, expected.__name__, type(value).__name__))


class Runtime(object):
    def __init__(self, spec, engine=None, engine_error=None):
        self.name = spec["name"]
        self.spec = spec
        self.engine = engine
        self.heartbeat_s = float(spec.get("heartbeat_s", protocol.HEARTBEAT_S))
        self.liveness = int(spec.get("liveness", protocol.LIVENESS))
        self.concurrency = int(spec.get("concurrency", 1))
        self.parent_pid = spec.get("parent_pid")
        self.started = time.monotonic()
        self.operations = operations_of(engine) if engine is not None else {}
        if engine_error is not None:
            self.state, self.error = protocol.DaemonState.FAILED, engine_error
        else:
            self.state, self.error = protocol.DaemonState.LOADING, None
        self.loads = 0
        self.facts = {}
        # (client, request id) -> CallContext of calls handed to workers.
        self.running = {}
        self.work = queue.Queue()
        self.stopping = False
        self.context = zmq.Context.instance()
        self.local = threading.local()

    # --- threads other than main -------------------------------------------

    def _push(self, tag, frames):
        push = getattr(self.local, "push", None)
        if push is None:
            push = self.local.push = self.context.socket(zmq.PUSH)
            push.connect(_WORKER_ENDPOINT)
        push.send_multipart([tag] + list(frames), copy=False)

    def _lifecycle(self, action):
        try:
            if action == "load":
                self.engine.load()
                self.loads += 1
                facts = self.engine.describe() or {}
                self._push(_TAG_STATE, [protocol.encode(
                    {"state": protocol.DaemonState.READY, "facts": facts})[0]])
            else:
                self.engine.unload()
                self._push(_TAG_STATE, [protocol.encode(
                    {"state": protocol.DaemonState.UNLOADED})[0]])
        except Exception as exc:
            log.error("%s failed: %s", action, exc)
            log.debug("%s", traceback.format_exc())
            message = "{} failed: {}: {}".format(action, type(exc).__name__, exc)
            self._push(_TAG_STATE, [protocol.encode(
                {"state": protocol.DaemonState.FAILED, "error": message})[0]])

    def _worker(self):
        while True:
            item = self.work.get()
            if item is None:
                return
            ctx, client, method, arguments = item
            self._run_call(ctx, client, method, arguments)

    def _run_call(self, ctx, client, method, arguments):
        base = {"id": ctx.request_id, "client": client}
        seq = [0]

        def send(kind, value):
            header = dict(base, kind=kind)
            if kind == protocol.PARTIAL:
                header["seq"] = seq[0]
                seq[0] += 1
                self._push(_TAG_FORWARD, protocol.encode_value_message(header, "value", value))
            else:
                header.update(value)
                self._push(_TAG_FORWARD, protocol.encode(header))

        ctx._send = send
        started = time.monotonic()
        try:
            ctx.check_cancelled()
            outcome = method(ctx, **arguments)
            if inspect.isgenerator(outcome):
                outcome = self._drain(ctx, outcome)
            frames = protocol.encode_value_message(dict(base, kind=protocol.RESULT), "value",
                                                   outcome)
        except Cancelled as exc:
            frames = protocol.encode(dict(base, kind=protocol.CANCELLED, message=exc.message))
        except ModelhostError as exc:
            frames = protocol.encode(dict(base, **protocol.error_header(
                ctx.request_id, exc.code, exc.message, exc.details)))
        except Exception as exc:
            log.error("call %s %s raised %s: %s\n%s", ctx.request_id, ctx.method,
                      type(exc).__name__, exc, traceback.format_exc())
            frames = protocol.encode(dict(base, **protocol.error_header(
                ctx.request_id, "engine_error",
                "{} raised {}: {}".format(ctx.method, type(exc).__name__, exc),
                {"type": type(exc).__name__})))
        log.debug("call %s %s done in %.3fs", ctx.request_id, ctx.method,
                  time.monotonic() - started)
        self._push(_TAG_TERMINAL, frames)

    @staticmethod
    def _drain(ctx, generator):
        while True:
            ctx.check_cancelled()
            try:
                chunk = next(generator)
            except StopIteration as stop:
                return stop.value
            ctx.partial(chunk)

    # --- main thread ---------------------------------------------------------

    def _send(self, header, payloads=()):
        self.socket.send_multipart(protocol.encode(header, payloads), copy=False)

    def _register(self):
        running = [{"id": ctx.request_id, "client": client, "method": ctx.method}
                   for (client, _), ctx in self.running.items()]
        self._send({
            "op": protocol.REGISTER,
            "name": self.name,
            "pid": os.getpid(),
            "interpreter": protocol.interpreter_description(),
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "engine": self.spec.get("engine"),
            "methods": sorted(self.operations),
            "concurrency": self.concurrency,
            "state": self.state,
            "error": self.error,
            "facts": self.facts,
            "loads": self.loads,
            "uptime_s": time.monotonic() - self.started,
            "running": running,
        })

    def _on_call(self, header, payloads):
        request_id, client = header.get("id"), header.get("client")
        base = {"id": request_id, "client": client}
        method = self.operations.get(header.get("method"))
        if self.state != protocol.DaemonState.READY:
            self._reply_error(base, "daemon_unavailable", "daemon {} is {}{}".format(
                self.name, self.state, ": " + self.error if self.error else ""))
            return
        if method is None:
            self._reply_error(base, "unknown_method", "{} has no method {!r}; it offers: {}".format(
                self.name, header.get("method"), ", ".join(sorted(self.operations))))
            return
        ctx = CallContext(request_id, header.get("method"), bool(header.get("stream")), None)
        try:
            arguments = protocol.internalize(header.get("args") or {}, payloads)
            check_arguments(method, ctx, arguments)
        except ModelhostError as exc:
            self._reply_error(base, exc.code, exc.message)
            return
        self.running[(client, request_id)] = ctx
        self.work.put((ctx, client, method, arguments))

    def _reply_error(self, base, code, message):
        self._send(dict(base, **protocol.error_header(base["id"], code, message)))

    def _on_broker(self, frames):
        try:
            header, payloads = protocol.decode(frames)
        except ModelhostError as exc:
            log.error("dropped a message from the broker: %s", exc)
            return
        op = header.get("op")
        if op == protocol.CALL:
            self._on_call(header, payloads)
        elif op == protocol.CANCEL:
            ctx = self.running.get((header.get("client"), header.get("id")))
            if ctx is not None:
                ctx.cancel()
        elif op == protocol.REREGISTER:
            log.info("the broker asked this daemon to register again")
            self._register()
        elif op != protocol.HEARTBEAT:
            log.warning("ignored unknown command %r from the broker", op)

    def _on_worker(self, frames):
        tag, frames = frames[0].bytes, frames[1:]
        if tag == _TAG_STATE:
            update = protocol.decode_header(frames[0])
            self.state = update["state"]
            self.error = update.get("error")
            self.facts = update.get("facts", self.facts)
            log.info("state %s%s", self.state, ": " + self.error if self.error else "")
            self._send({"op": protocol.STATE, "state": self.state, "error": self.error,
                        "facts": self.facts, "loads": self.loads})
            return
        if tag == _TAG_TERMINAL:
            header = protocol.decode_header(frames[0])
            self.running.pop((header.get("client"), header.get("id")), None)
        self.socket.send_multipart(frames, copy=False)

    def _parent_gone(self):
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def run(self):
        """Serve until SIGTERM or until the supervising parent dies; returns the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        pull = self.context.socket(zmq.PULL)
        pull.bind(_WORKER_ENDPOINT)
        self.socket = self.context.socket(zmq.DEALER)
        # An explicit identity lets a restarted broker route replies of calls
        # that were running when the old one died.
        self.socket.setsockopt(zmq.ROUTING_ID, "{}:{}".format(self.name, os.getpid()).encode())
        self.socket.setsockopt(zmq.LINGER, 1000)
        self.socket.connect(self.spec["backend"])
        for _ in range(self.concurrency):
            threading.Thread(target=self._worker, daemon=True).start()
        if self.state == protocol.DaemonState.LOADING:
            threading.Thread(target=self._lifecycle, args=("load",), daemon=True).start()

        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        self._register()
        broker_seen = time.monotonic()
        broker_lost = False
        next_heartbeat = time.monotonic() + self.heartbeat_s
        while not self.stopping:
            timeout_ms = max(0, (next_heartbeat - time.monotonic()) * 1000)
            events = dict(poller.poll(timeout_ms))
            if pull in events:
                # Drain what workers produced before reading new calls.
                while True:
                    try:
                        self._on_worker(pull.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            if self.socket in events:
                while True:
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    broker_seen = time.monotonic()
                    if broker_lost:
                        log.info("the broker is back")
                        broker_lost = False
                    self._on_broker(frames)
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
                    self._send({"op": protocol.HEARTBEAT, "state": self.state,
                                "running": len(self.running)})
        self._shutdown()
        return 0

    def _on_signal(self, signum, frame):
        self.stopping = True

    def _shutdown(self):
        for ctx in self.running.values():
            ctx.cancel()
        for _ in range(self.concurrency):
            self.work.put(None)
        if self.engine is not None and self.state == protocol.DaemonState.READY:
            try:
                self.engine.unload()
            except Exception as exc:
                log.warning("unload at exit failed: %s", exc)
        log.info("stopped")
