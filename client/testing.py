"""A fake broker for testing your own programs: the real Client against plain functions.

    from modelhost.testing import FakeBroker

    def tts(text, voice="en"):
        return {"audio": b"\\x00\\x00" * 100, "sample_rate": 22050}

    with FakeBroker({"espeak": {"tts": tts}}) as broker:
        with broker.client() as client:          # a real modelhost.Client
            client.call("espeak", "tts", text="hi")
        assert broker.calls[0].args == {"text": "hi"}

As httpx ships a mock transport, this ships a broker: a real ZeroMQ ROUTER in a
thread of its own, on a private ipc:// endpoint, speaking the real wire
protocol. Code under test keeps its real `Client` or `AsyncClient` (made by
`broker.client()`, or `Client(broker.endpoint)`, or `Client()` with
$MODELHOST_ENDPOINT set to `broker.endpoint`); no broker process, no daemons.

Handlers, {model: {method: handler}}, stand in for the daemons' operations:
- called with the call's arguments as keyword arguments; a handler with a
  parameter named `ctx` also gets the call's context there (`FakeContext`:
  progress(), partial(), cancelled, check_cancelled()), as an engine
  operation does, so an engine's bound method is a handler too;
- the return value is the result; a generator's yields are streamed as
  partial chunks and its return value is the result;
- a raised modelhost error reaches the client as that error (raise
  `Cancelled` to end as cancelled); any other exception as EngineError, its
  traceback logged to the "modelhost.testing" logger.

As the real broker: every request gets exactly one terminal reply; unknown
models and methods get UnknownModel and UnknownMethod; cancellation is
cooperative (a generator is stopped at its next chunk, a plain function sees
`ctx.cancelled`); a call's timeout is answered with Timeout and the handler
told to stop; pings keep the client's liveness; `ps`, load, unload, pin and
unpin answer with a row per model. Not faked: queues, memory, the event
stream (`client.events()` raises BrokerUnavailable).

Each call runs on a thread of its own, so handlers may block (and a test may
hold one on a threading.Event to cancel it). Runs on Python 3.7 with only
pyzmq and msgpack, as the client does.
"""

import collections
import inspect
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid

import zmq

from . import protocol
from ._async_client import AsyncClient
from ._client import Client
from .errors import (BadArguments, BadMessage, Cancelled, EngineError, InternalError,
                     ModelhostError, Timeout, UnknownMethod, UnknownModel)

__all__ = ["FakeBroker", "FakeContext", "RecordedCall"]

log = logging.getLogger("modelhost.testing")

# ipc:// paths are limited to about 107 bytes.
_MAX_IPC_PATH = 100


class RecordedCall(collections.namedtuple(
        "RecordedCall", "id model method args priority timeout stream client")):
    """A call the fake broker received, as the client sent it (args decoded: bytes and
    numpy arrays as they arrived; `client`: the sender's socket identity, since ids
    are numbered per client)."""

    __slots__ = ()


class FakeContext(object):
    """What a handler's `ctx` parameter gets: the engine's CallContext, faked."""

    def __init__(self, request_id, method, stream, send):
        self.request_id = request_id
        self.method = method
        # True when the client iterates the chunks (Client.stream).
        self.stream = stream
        self._send = send
        self._cancelled = threading.Event()
        self._seq = 0  # numbers the partial chunks, as the daemon runtime does

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def check_cancelled(self):
        """Raise Cancelled if the client cancelled the call (or its timeout passed)."""
        if self._cancelled.is_set():
            raise Cancelled("the call was cancelled")

    def wait_cancelled(self, timeout=None):
        """Block until the call is cancelled (True) or `timeout` seconds pass (False).

        Not in the engine's CallContext: a test's way to hold a call until the
        program under test cancels it.
        """
        return self._cancelled.wait(timeout)

    def progress(self, fraction=None, stage=None, message=None):
        """Report progress: fraction in [0, 1], a stage name, a line for people."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._send(protocol.progress_reply(self.request_id, None, fraction, stage, message),
                   False)

    def partial(self, value):
        """Stream one chunk to the client (the same as yielding it)."""
        frames = protocol.partial_reply(self.request_id, None, self._seq, value)
        self._seq += 1
        self._send(frames, False)

    def cancel(self):
        self._cancelled.set()


# A call whose handler has not had its terminal reply sent yet; deadline in
# time.monotonic() seconds, or None.
_Running = collections.namedtuple("_Running", "model ctx deadline")


class FakeBroker(object):
    """An in-process broker serving `handlers` ({model: {method: handler}}) at `endpoint`.

    `endpoint`: None binds an ipc:// socket in a private temporary directory;
    "tcp://127.0.0.1:*" picks a free port (`.endpoint` says which). Serving
    starts at once; close() (or leaving the `with` block) stops it. `handlers`
    may be changed while it runs; a call sees them as they are when it arrives.
    """

    def __init__(self, handlers=None, endpoint=None):
        self.handlers = {} if handlers is None else handlers
        self.instance = "fake-" + uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._calls = []
        self._cancels = []
        self._tiers = {}  # model -> (state, tier) after load/unload
        self._pinned = set()
        self._started = time.monotonic()
        self._running = {}  # (client identity, request id) -> _Running; broker thread only
        self._workers = []
        # Replies from handler threads, sent by the broker thread (the only one
        # that touches the ROUTER); a byte on the socket pair wakes it.
        self._outbox = queue.Queue()
        self._wake_receiver, self._wake_sender = socket.socketpair()
        self._wake_receiver.setblocking(False)
        self._wake_sender.setblocking(False)
        self._stopping = False
        self._dir = None
        self._context = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        try:
            self.endpoint = self._bind(endpoint)
        except Exception:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._serve, name="modelhost-fake-broker",
                                        daemon=True)
        self._thread.start()

    # --- public -------------------------------------------------------------

    @property
    def calls(self):
        """Every call received, in arrival order (unknown models and methods too)."""
        with self._lock:
            return list(self._calls)

    @property
    def cancels(self):
        """The ids of the requests a client asked to cancel, in arrival order."""
        with self._lock:
            return list(self._cancels)

    def client(self, **options):
        """A modelhost.Client connected to this broker (options as for Client)."""
        return Client(self.endpoint, **options)

    def async_client(self, **options):
        """A modelhost.AsyncClient connected to this broker (options as for AsyncClient)."""
        return AsyncClient(self.endpoint, **options)

    def close(self, timeout=5.0):
        """Stop serving: running handlers are told to cancel and waited for up to `timeout`."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        self._thread.join()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        self._close_sockets()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- set-up ---------------------------------------------------------------

    def _bind(self, endpoint):
        if endpoint is None:
            self._dir = tempfile.mkdtemp(prefix="mh-fake-")
            if len(self._dir) > _MAX_IPC_PATH - len("/frontend.sock"):
                os.rmdir(self._dir)
                self._dir = tempfile.mkdtemp(prefix="mh-fake-", dir="/tmp")
            endpoint = "ipc://" + os.path.join(self._dir, "frontend.sock")
        self._router.bind(endpoint)
        bound = self._router.getsockopt(zmq.LAST_ENDPOINT)
        return bound.decode() if isinstance(bound, bytes) else bound

    def _close_sockets(self):
        self._router.close(linger=0)
        self._context.term()
        self._wake_receiver.close()
        self._wake_sender.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _wake(self):
        try:
            self._wake_sender.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full: the broker thread has a wake-up waiting already; closed: stopped

    # --- the broker thread ----------------------------------------------------

    def _serve(self):
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_receiver, zmq.POLLIN)
        try:
            while not self._stopping:
                poller.poll(self._poll_timeout_ms())
                self._drain_wakes()
                self._send_outbox()
                while protocol.readable(self._router):
                    frames = protocol.recv(self._router)
                    # What a handler sent before this message arrived goes out
                    # before the message is handled, as from a daemon in order.
                    self._send_outbox()
                    self._on_message_safely(frames[0].bytes, frames[1:])
                self._expire()
        finally:
            for running in self._running.values():
                running.ctx.cancel()

    def _poll_timeout_ms(self):
        deadlines = [running.deadline for running in self._running.values()
                     if running.deadline is not None]
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _drain_wakes(self):
        try:
            while self._wake_receiver.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _reply(self, client, frames, request_id=None):
        """Send to a client; with request_id, as that request's one terminal reply."""
        if request_id is not None:
            if self._running.pop((client, request_id), None) is None:
                return  # answered already (its timeout passed): drop it
        protocol.send(self._router, [client] + frames)

    def _answer(self, client, request_id, value):
        self._reply(client, protocol.result_reply(request_id, value))

    def _refuse(self, client, request_id, error):
        self._reply(client, protocol.error_reply(request_id, error))

    def _send_outbox(self):
        while True:
            try:
                client, request_id, frames, terminal = self._outbox.get_nowait()
            except queue.Empty:
                return
            if terminal:
                self._reply(client, frames, request_id)
            elif (client, request_id) in self._running:
                self._reply(client, frames)

    def _expire(self):
        now = time.monotonic()
        for (client, request_id), running in list(self._running.items()):
            if running.deadline is not None and now >= running.deadline:
                running.ctx.cancel()
                self._reply(client, protocol.error_reply(request_id, Timeout(
                    "the call did not finish within its timeout; "
                    "the daemon was told to stop it")), request_id)

    def _on_message_safely(self, client, frames):
        try:
            self._on_message(client, frames)
        except Exception:
            # A bug here (or `handlers` that are not {model: {method: handler}}):
            # the request still gets its one terminal reply, and serving goes on.
            log.exception("the fake broker failed on a request; answered `internal`")
            try:
                request_id = protocol.decode(frames)[0].get("id")
            except ModelhostError:
                return
            self._running.pop((client, request_id), None)
            self._refuse(client, request_id, InternalError(
                "the fake broker failed on this request (its log has the details)"))

    def _on_message(self, client, frames):
        try:
            header, payloads = protocol.decode(frames)
            protocol.check_request(header)
        except ModelhostError as exc:
            self._refuse(client, exc.details.get("id"), exc)
            return
        op, request_id = header["op"], header["id"]
        if op == protocol.PING:
            known = [rid for rid in header.get("ids", []) if (client, rid) in self._running]
            self._reply(client, protocol.pong_reply(request_id, known, self.instance, True))
        elif op == protocol.CANCEL:
            with self._lock:
                self._cancels.append(request_id)
            running = self._running.get((client, request_id))
            if running is not None:
                running.ctx.cancel()  # cooperative: the handler's end is the terminal reply
        elif (client, request_id) in self._running:
            self._refuse(client, request_id, BadMessage(
                "request id {!r} is already in use by this client; use a new id per "
                "request".format(request_id)))
        elif op == protocol.CALL:
            self._on_call(client, header, payloads)
        elif op == protocol.PS:
            self._answer(client, request_id, self._status())
        elif op == protocol.SUPERVISOR:
            self._refuse(client, request_id, BadMessage(
                "supervisor reports come only from the supervisor that started this broker "
                "(`modelhost up`)"))
        else:  # load, unload, pin, unpin
            self._on_model_op(client, op, request_id, header["model"])

    def _refuse_model(self, client, request_id, name):
        self._refuse(client, request_id, UnknownModel("no model named {!r}; this broker "
                     "serves: {}".format(name, ", ".join(self.handlers) or "none")))

    def _on_model_op(self, client, op, request_id, model):
        if model not in self.handlers:
            self._refuse_model(client, request_id, model)
            return
        with self._lock:
            if op in (protocol.LOAD, protocol.UNLOAD):
                self._tiers[model] = (
                    (protocol.DaemonState.READY, protocol.Tier.RESIDENT) if op == protocol.LOAD
                    else (protocol.DaemonState.UNLOADED, protocol.Tier.UNLOADED))
            elif op == protocol.PIN:
                self._pinned.add(model)
            else:
                self._pinned.discard(model)
        self._answer(client, request_id, self._row(model))

    def _on_call(self, client, header, payloads):
        request_id, model, method = header["id"], header["model"], header["method"]
        timeout = header.get("timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            args = protocol.internalize(header.get("args") or {}, payloads)
        except ModelhostError as exc:
            self._refuse(client, request_id, exc)
            return
        with self._lock:
            self._calls.append(RecordedCall(
                request_id, model, method, args, header.get("priority", protocol.Priority.NORMAL),
                timeout, header.get("stream", False), client))
        methods = self.handlers.get(model)
        if methods is None:
            self._refuse_model(client, request_id, model)
            return
        if method not in methods:
            self._refuse(client, request_id, UnknownMethod("{} has no method {!r}; it "
                         "offers: {}".format(model, method, ", ".join(sorted(methods)))))
            return

        def send(frames, terminal):
            self._outbox.put((client, request_id, frames, terminal))
            self._wake()

        ctx = FakeContext(request_id, method, bool(header.get("stream")), send)
        self._running[(client, request_id)] = _Running(model, ctx, deadline)
        with self._lock:
            self._tiers.pop(model, None)  # called: resident again, as the broker would load it
        worker = threading.Thread(target=_run_handler, args=(methods[method], ctx, args, send),
                                  name="modelhost-fake-{}.{}".format(model, method), daemon=True)
        self._workers = [thread for thread in self._workers if thread.is_alive()] + [worker]
        worker.start()

    # --- ps -------------------------------------------------------------------

    def _row(self, model):
        """The model's `ps` row, with the keys the real broker's rows have."""
        with self._lock:
            state, tier = self._tiers.get(model, (protocol.DaemonState.READY,
                                                  protocol.Tier.RESIDENT))
            pinned = model in self._pinned
        running = sum(1 for item in self._running.values() if item.model == model)
        if state == protocol.DaemonState.READY and running:
            state = protocol.DaemonState.BUSY
        return {
            "name": model, "state": state, "pid": None, "interpreter": None, "python": None,
            "engine": "modelhost.testing", "methods": sorted(self.handlers.get(model) or ()),
            "uptime_s": time.monotonic() - self._started, "queued": 0, "running": running,
            "concurrency": None, "max_queue": None, "loads": 0, "restarts": 0,
            "last_error": None, "facts": {}, "tier": tier, "target": None,
            "tiers": [protocol.Tier.RESIDENT, protocol.Tier.UNLOADED], "device": None,
            "pinned": pinned, "memory_bytes": None, "footprint": None, "idle_ttl_s": None,
            "ttl_s": None, "evictions": 0, "moves": {}, "ready_pids": [],
        }

    def _status(self):
        return {
            "broker": {"pid": os.getpid(), "instance": self.instance,
                       "uptime_s": time.monotonic() - self._started,
                       "protocol": protocol.VERSION, "frontend": self.endpoint,
                       "events": None, "http": None, "config": None},
            "time": time.time(),
            "memory": {"probe": "none", "reason": "modelhost.testing.FakeBroker",
                       "devices": []},
            "daemons": [self._row(model) for model in self.handlers],
            "stop": [],
        }


def _run_handler(handler, ctx, args, send):
    """Run one call on its own thread and send its terminal reply (never raises)."""
    try:
        ctx.check_cancelled()
        outcome = handler(**_bound_arguments(handler, ctx, args))
        if inspect.isgenerator(outcome):
            outcome = _drain(ctx, outcome)
        frames = protocol.result_reply(ctx.request_id, outcome)
    except Cancelled as exc:
        frames = protocol.cancelled_reply(ctx.request_id, exc.message)
    except ModelhostError as exc:
        frames = protocol.error_reply(ctx.request_id, exc)
    except Exception as exc:
        log.error("rid=%s %s raised %s: %s\n%s", ctx.request_id, ctx.method,
                  type(exc).__name__, exc, traceback.format_exc())
        frames = protocol.error_reply(ctx.request_id, EngineError("{} raised {}: {}".format(
            ctx.method, type(exc).__name__, exc), {"type": type(exc).__name__}))
    send(frames, True)


def _bound_arguments(handler, ctx, args):
    """The handler's keyword arguments: the call's, plus `ctx` where it takes one;
    BadArguments (as the daemon runtime raises) when they do not fit its signature."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return dict(args)  # no signature to read (a builtin): let the call say
    arguments = dict(args)
    if "ctx" in signature.parameters:
        if "ctx" in arguments:
            raise BadArguments("{}: `ctx` is the call's context, not an argument".format(
                ctx.method))
        arguments["ctx"] = ctx
    try:
        signature.bind(**arguments)
    except TypeError as exc:
        accepted = [name for name in signature.parameters if name != "ctx"]
        raise BadArguments("{}: {} (accepted arguments: {})".format(
            ctx.method, exc, ", ".join(accepted) or "none"))
    return arguments


def _drain(ctx, generator):
    """Stream a generator's chunks, stopped before its next chunk once cancelled (as the
    daemon runtime does; the client may not import it)."""
    try:
        while True:
            ctx.check_cancelled()
            ctx.partial(next(generator))
    except StopIteration as stop:
        return stop.value
    finally:
        generator.close()
