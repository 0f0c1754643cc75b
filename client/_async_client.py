"""The asyncio client: one socket, one reader task that routes replies by request id."""

import asyncio
import time

import zmq
import zmq.asyncio

from . import _curve
from . import _messages as m
from . import protocol
from ._connection import BaseClient, ClientState, transport_error
from .errors import BrokerUnavailable, ModelhostError, Timeout, TransportError
from .models import AsyncModelCalls


class AsyncClient(BaseClient, AsyncModelCalls):
    """An asyncio modelhost client; safe to share between tasks of one event loop.

        async with AsyncClient() as client:
            result = await client.call("espeak", "tts", text="hello")

    Cancelling the task awaiting a call cancels the remote work. `curve`: see BaseClient.
    """

    _context_class = zmq.asyncio.Context

    def __init__(self, endpoint=None, *, timeout=None, broker_timeout=10.0, context=None,
                 curve=None):
        super().__init__(endpoint, timeout=timeout, broker_timeout=broker_timeout,
                         context=context, curve=curve)
        # request id -> asyncio.Queue of (header, payloads), or of the error that
        # stopped the reader
        self._queues = {}
        # Requests whose message has left: only these may be asked about in a
        # ping (a request still being sent is unknown to the broker for now).
        self._sent = set()
        self._pings = m.Pings()
        self._reader = None
        self._last_heard = time.monotonic()

    async def call(self, model, method, *, timeout=m.NOT_SET, on_progress=None,
                   priority=protocol.Priority.NORMAL, arguments=None, **kwargs):
        """Run `method` of `model` and return its result (see Client.call)."""
        result = None
        async for header, payloads in self._run(model, method, timeout, priority,
                                                m.merge_arguments(arguments, kwargs), False):
            if header["kind"] == protocol.PROGRESS and on_progress is not None:
                on_progress(m.progress_of(header))
            elif header["kind"] == protocol.RESULT:
                result = protocol.reply_value(header, payloads, self._shm.reader(header))
        return result

    async def stream(self, model, method, *, timeout=m.NOT_SET, on_progress=None,
                     priority=protocol.Priority.NORMAL, arguments=None, **kwargs):
        """Async-iterate the partial chunks of a streaming method."""
        async for header, payloads in self._run(model, method, timeout, priority,
                                                m.merge_arguments(arguments, kwargs), True):
            if header["kind"] == protocol.PARTIAL:
                yield protocol.reply_value(header, payloads, self._shm.reader(header))
            elif header["kind"] == protocol.PROGRESS and on_progress is not None:
                on_progress(m.progress_of(header))

    async def ps(self, *, timeout=5.0):
        request_id = self._new_id()
        queue = self._open(request_id)
        try:
            await self._send(protocol.ps_message(request_id))
            self._sent.add(request_id)
            header, payloads = await self._next_reply(queue, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable(_curve.explain(
                self._handshake, "no answer from the broker at {} within {:.0f}s".format(
                    self.endpoint, timeout)))
        finally:
            self._queues.pop(request_id, None)
            self._sent.discard(request_id)
        if header["kind"] != protocol.RESULT:
            raise protocol.reply_error(header)
        return protocol.reply_value(header, payloads)

    async def load(self, name, *, timeout=None, priority=protocol.Priority.NORMAL):
        """Make daemon `name` resident and return its `ps` row (see Client.load)."""
        return await self._model_op(protocol.LOAD, name, timeout, priority)

    async def unload(self, name, *, timeout=None):
        """Release daemon `name`'s weights once its running calls end; returns its `ps` row."""
        return await self._model_op(protocol.UNLOAD, name, timeout)

    async def pin(self, name):
        """Keep daemon `name` from ever being evicted; returns its `ps` row."""
        return await self._model_op(protocol.PIN, name)

    async def unpin(self, name):
        """Let daemon `name` be evicted again; returns its `ps` row."""
        return await self._model_op(protocol.UNPIN, name)

    async def cancel(self, request_id):
        await self._send(protocol.cancel_message(request_id))

    async def aclose(self):
        if self._state is ClientState.OPEN:
            if self._reader is not None:
                self._reader.cancel()
            self._close_socket()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    # --- internals ----------------------------------------------------------

    async def _send(self, frames, copy=True):
        try:
            await _curve.wait_to_send_async(self._handshake, self._socket, self.broker_timeout)
            await self._socket.send_multipart(frames, copy=copy)
        except zmq.ZMQError as exc:
            raise transport_error("send to", self.endpoint, exc) from exc

    @staticmethod
    async def _next_reply(queue, wait):
        """A request's next (header, payloads); raises the error that stopped the reader."""
        reply = await asyncio.wait_for(queue.get(), wait)
        if isinstance(reply, ModelhostError):
            raise reply
        return reply

    def _open(self, request_id):
        if not self._queues:
            # The broker's silence counts from now: an idle client hears nothing
            # and must not take that for a dead broker.
            self._last_heard = time.monotonic()
        queue = self._queues[request_id] = asyncio.Queue()
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        return queue

    def _run(self, model, method, timeout, priority, args, stream):
        if timeout is m.NOT_SET:
            timeout = self.timeout
        request_id = self._new_id()

        async def frames():
            # Built once the exchange runs: the first call with a large leaf asks the
            # broker where its daemons stand (shared memory) first.
            shm = self._shm
            if shm.needs_info(model, args):
                try:
                    shm.learn((await self.ps(timeout=min(5.0, self.broker_timeout)))
                              ["broker"].get("shm"))
                except ModelhostError:
                    shm.learn(None)
            return protocol.call_message(request_id, model, method, args, priority, stream,
                                         timeout, shm.offer(request_id),
                                         shm.writer(request_id, model))

        return self._exchange(request_id, frames, timeout)

    async def _model_op(self, op, model, timeout=None, priority=None):
        request_id = self._new_id()
        frames = protocol.model_message(op, request_id, model, timeout, priority)
        result = None
        async for header, payloads in self._exchange(request_id, frames, timeout):
            if header["kind"] == protocol.RESULT:
                result = protocol.reply_value(header, payloads)
        return result

    async def _exchange(self, request_id, frames, timeout):
        """Send a tracked request; yield its replies up to its result, raise its error.

        `frames` may be a coroutine function that builds them."""
        queue = self._open(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout + m.TIMEOUT_GRACE_S
        finished = result = False
        try:
            if callable(frames):
                frames = await frames()
            await self._send(frames, copy=False)
            self._sent.add(request_id)
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    header, payloads = await self._next_reply(queue, wait)
                except asyncio.TimeoutError:
                    raise Timeout("no reply within the timeout (and {:.0f}s grace); the broker "
                                  "was asked to cancel the request".format(m.TIMEOUT_GRACE_S))
                kind = header["kind"]
                if kind in (protocol.ERROR, protocol.CANCELLED):
                    finished = True
                    raise protocol.reply_error(header)
                yield header, payloads
                if kind == protocol.RESULT:
                    finished = result = True
                    return
        finally:
            self._queues.pop(request_id, None)
            self._sent.discard(request_id)
            while not queue.empty():
                reply = queue.get_nowait()
                if isinstance(reply, tuple):
                    self._shm.discard(reply[0])
            self._shm.finish(request_id, result)
            if not finished and self._state is ClientState.OPEN:
                # Cancelled task, timeout, or an abandoned stream: stop the remote work.
                try:
                    await self.cancel(request_id)
                except TransportError:
                    pass  # a socket that cannot send: what failed the request says why

    async def _read(self):
        """Route replies to their request's queue; ping while requests are outstanding."""
        last_ping = 0.0
        try:
            while self._queues:
                if await self._socket.poll(protocol.HEARTBEAT_S * 1000, zmq.POLLIN):
                    while protocol.readable(self._socket):
                        frames = await self._socket.recv_multipart(copy=False)
                        self._last_heard = time.monotonic()
                        self._route(*protocol.decode(frames))
                if time.monotonic() - last_ping >= protocol.HEARTBEAT_S:
                    # Pings keep this client alive in the broker's eyes and
                    # reveal requests that a restarted broker no longer knows.
                    last_ping = time.monotonic()
                    # Best effort: a socket that cannot send (a refused handshake) must
                    # not hold up the reader, which reports the silence below.
                    if _curve.writable(self._handshake, self._socket):
                        await self._socket.send_multipart(self._pings.frames(self._sent))
                    silent = time.monotonic() - self._last_heard
                    if silent > self.broker_timeout:
                        error = protocol.error_header(None, BrokerUnavailable(_curve.explain(
                            self._handshake, "no answer from the broker at {} for {:.0f}s; "
                            "is `modelhost up` running?".format(self.endpoint, silent))))
                        for queue in self._queues.values():
                            queue.put_nowait((error, []))
                        return
        except asyncio.CancelledError:
            if self._state is ClientState.OPEN and self._socket.closed:
                # Closed under the client (its context destroyed): pyzmq cancels what
                # waits on the socket, which is no reason for the calls to wait for ever.
                for queue in self._queues.values():
                    queue.put_nowait(TransportError(
                        "cannot receive from the broker at {}: the client's socket was "
                        "closed (its ZeroMQ context terminated)".format(self.endpoint)))
        except (zmq.ZMQError, ModelhostError) as exc:
            # The socket failed, or a reply could not be read (whose it was is unknown):
            # every waiting request ends with the reason. A new request starts a new reader.
            for queue in self._queues.values():
                queue.put_nowait(self._reader_failure(exc))

    def _reader_failure(self, exc):
        """A fresh error for one waiting request, raised from what stopped the reader."""
        if isinstance(exc, zmq.ZMQError):
            error, cause = transport_error("receive from", self.endpoint, exc), exc
        else:  # BadMessage or ProtocolMismatch from decoding a reply
            error, cause = type(exc)(exc.message, exc.details), exc.__cause__
        error.__cause__ = cause
        return error

    def _route(self, header, payloads):
        if header.get("kind") == protocol.PONG:
            for request_id in self._pings.lost(header):
                queue = self._queues.get(request_id)
                if queue is not None and queue.empty():
                    queue.put_nowait((m.lost_reply(request_id), []))
            return
        queue = self._queues.get(header.get("id"))
        if queue is not None:
            queue.put_nowait((header, payloads))
        elif "shm" in header:
            self._shm.discard(header)  # a reply nobody waits for any more
