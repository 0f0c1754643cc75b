"""The blocking client. One socket, used from one thread at a time."""

import collections
import time

import zmq

from . import _curve
from . import _messages as m
from . import protocol
from ._connection import BaseClient, ClientState, open_socket, transport_error
from .errors import BrokerUnavailable, ModelhostError, Timeout
from .models import ModelCalls


class Stream(object):
    """Iterates a call's partial chunks; `.result` holds the final value afterwards."""

    def __init__(self, client, request_id, deadline, on_progress):
        self._client = client
        self.request_id = request_id
        self._deadline = deadline
        self._on_progress = on_progress
        self.result = None
        self.done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        for header, payloads in self._client._replies(self.request_id, self._deadline):
            kind = header["kind"]
            if kind == protocol.PARTIAL:
                return protocol.reply_value(header, payloads, self._client._shm.reader(header))
            if kind == protocol.PROGRESS:
                if self._on_progress is not None:
                    self._on_progress(m.progress_of(header))
                continue
            self.done = True
            if kind == protocol.RESULT:
                self.result = protocol.reply_value(header, payloads, self._client._shm.reader(header))
                raise StopIteration
            raise protocol.reply_error(header)

    def cancel(self):
        """Ask the broker to cancel the call; iteration then ends with Cancelled."""
        if not self.done:
            self._client.cancel(self.request_id)

    def close(self):
        """Stop listening: cancel the call if it is still going and drop what it sends."""
        if not self.done:
            self.cancel()
            self.done = True
            self._client._forget(self.request_id)


class Client(BaseClient, ModelCalls):
    """A blocking modelhost client.

        with Client() as client:
            audio = client.call("espeak", "tts", text="hello")

    Not thread-safe: use one Client per thread. `curve`: see BaseClient.
    """

    def __init__(self, endpoint=None, *, timeout=None, broker_timeout=10.0, context=None,
                 curve=None):
        super().__init__(endpoint, timeout=timeout, broker_timeout=broker_timeout,
                         context=context, curve=curve)
        # Replies that arrived for requests other than the one being waited on.
        self._mailbox = collections.defaultdict(collections.deque)
        self._outstanding = set()
        self._last_heard = time.monotonic()
        self._last_ping = 0.0
        self._pings = m.Pings()
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    # --- public -------------------------------------------------------------

    def call(self, model, method, *, timeout=m.NOT_SET, on_progress=None,
             priority=protocol.Priority.NORMAL, arguments=None, **kwargs):
        """Run `method` of `model` and return its result.

        Keyword arguments are the method's arguments; bytes and numpy arrays
        among them travel as raw frames. `arguments={...}` passes names that
        this method reserves (timeout, on_progress, priority, arguments).
        Ctrl-C cancels the remote work before KeyboardInterrupt propagates.
        """
        stream = self._start(model, method, timeout, on_progress, priority,
                             m.merge_arguments(arguments, kwargs), stream=False)
        for _chunk in stream:
            pass  # an operation that streams anyway: chunks are dropped, the result kept
        return stream.result

    def stream(self, model, method, *, timeout=m.NOT_SET, on_progress=None,
               priority=protocol.Priority.NORMAL, arguments=None, **kwargs):
        """Run a streaming method; iterate the returned Stream for its chunks.

        Large payloads are sent without a copy, after this returns: do not
        modify an array or bytearray passed here until the stream answers.
        """
        return self._start(model, method, timeout, on_progress, priority,
                           m.merge_arguments(arguments, kwargs), stream=True)

    def ps(self, *, timeout=5.0):
        """The broker's status: {"broker": {...}, "daemons": [{name, state, pid, ...}]}."""
        request_id = self._new_id()
        self._expect(request_id)
        self._send(protocol.ps_message(request_id))
        try:
            for header, payloads in self._replies(request_id, time.monotonic() + timeout,
                                                  grace=0.0):
                if header["kind"] == protocol.RESULT:
                    return protocol.reply_value(header, payloads)
                raise protocol.reply_error(header)
        except Timeout:
            # The broker answers ps at once: silence means nobody is there.
            raise BrokerUnavailable(_curve.explain(
                self._handshake, "no answer from the broker at {} within {:.0f}s; is "
                "`modelhost up` running?".format(self.endpoint, timeout)))

    def events(self, *, kinds=None, timeout=None):
        """Iterate the broker's events as they happen: dicts with seq, time, kind,
        level, daemon and the fields of their kind (see `modelhost.protocol.EVENT_KINDS`
        and the README).

        `kinds` picks some (None: all). The iteration ends after `timeout`
        seconds without an event (None: never). Events from before the
        subscription connects are not seen, and a subscriber that falls far
        behind loses events rather than slowing the broker: read `ps()` for
        the current state.
        """
        kinds = list(protocol.EVENT_KINDS if kinds is None else kinds)
        unknown = [kind for kind in kinds if kind not in protocol.EVENT_KINDS]
        if unknown:
            raise ValueError("unknown event kind(s) {}; known: {}".format(
                ", ".join(map(repr, unknown)), ", ".join(protocol.EVENT_KINDS)))
        endpoint = self.ps()["broker"].get("events")
        if not endpoint:
            raise BrokerUnavailable("the broker at {} publishes no events; it is older than "
                                    "this client".format(self.endpoint))
        # Subscribed now, not at the first next(): what happens from here on is seen
        # (once ZeroMQ has connected, a few milliseconds).
        # A CURVE broker's events over tcp need the same keys as its frontend.
        socket, _ = open_socket(self._context, zmq.SUB, endpoint, self._curve_keys)
        for kind in kinds:
            socket.setsockopt(zmq.SUBSCRIBE, kind.encode())
        return self._event_stream(socket, endpoint, kinds, timeout)

    @staticmethod
    def _event_stream(socket, endpoint, kinds, timeout):
        try:
            while True:
                try:
                    if not socket.poll(None if timeout is None else int(timeout * 1000)):
                        return
                    frames = socket.recv_multipart()
                except zmq.ZMQError as exc:
                    raise transport_error("receive events from", endpoint, exc) from exc
                # A broker of another protocol version raises ProtocolMismatch here.
                event = protocol.decode_event(frames)
                # Topics are prefixes: "move" also matches "moved".
                if event.get("kind") in kinds:
                    event.pop("v", None)
                    yield event
        finally:
            socket.close(linger=0)

    def load(self, name, *, timeout=None, priority=protocol.Priority.NORMAL):
        """Make daemon `name` resident and return its `ps` row.

        This may take minutes: the weights load, or the broker first waits for
        room and evicts idle daemons. `timeout` (seconds, None: no limit) is
        enforced by the broker; a daemon that can never fit its device raises
        InsufficientMemory at once.
        """
        return self._model_op(protocol.LOAD, name, timeout, priority)

    def unload(self, name, *, timeout=None):
        """Release daemon `name`'s weights (its process stays) and return its `ps` row.

        The broker lets the daemon's running calls finish first.
        """
        return self._model_op(protocol.UNLOAD, name, timeout)

    def pin(self, name):
        """Keep daemon `name` from ever being evicted; returns its `ps` row."""
        return self._model_op(protocol.PIN, name)

    def unpin(self, name):
        """Let daemon `name` be evicted again; returns its `ps` row."""
        return self._model_op(protocol.UNPIN, name)

    def cancel(self, request_id):
        self._check_open()
        self._send(protocol.cancel_message(request_id))

    def close(self):
        if self._state is ClientState.OPEN:
            self._close_socket()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- internals ----------------------------------------------------------

    def _send(self, frames):
        try:
            _curve.wait_to_send(self._handshake, self._socket, self.broker_timeout)
            protocol.send(self._socket, frames)
        except zmq.ZMQError as exc:
            raise transport_error("send to", self.endpoint, exc) from exc

    def _expect(self, request_id):
        if not self._outstanding:
            # The broker's silence counts from now: an idle client hears nothing
            # and must not take that for a dead broker.
            self._last_heard = time.monotonic()
        self._outstanding.add(request_id)

    def _start(self, model, method, timeout, on_progress, priority, args, stream):
        if timeout is m.NOT_SET:
            timeout = self.timeout
        request_id = self._new_id()
        # Before it is expected: a ping sent while the broker is asked must not list it.
        offer, writer = self._shm_for(request_id, model, args)
        self._expect(request_id)
        try:
            self._send(protocol.call_message(request_id, model, method, args, priority, stream,
                                             timeout, offer, writer))
        except BaseException:
            self._forget(request_id)  # and its segments
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        return Stream(self, request_id, deadline, on_progress)

    def _shm_for(self, request_id, model, args):
        """The call's shared-memory offer and Writer; the broker is asked where its
        daemons stand before the first call with a large leaf."""
        shm = self._shm
        if shm.needs_info(model, args):
            try:
                shm.learn(self.ps(timeout=min(5.0, self.broker_timeout))["broker"].get("shm"))
            except ModelhostError:
                shm.learn(None)  # frames this time; asked again later
        return shm.offer(request_id), shm.writer(request_id, model)

    def _model_op(self, op, model, timeout=None, priority=None):
        # A tracked request like a call: pings keep it alive in the broker's
        # eyes and reveal it lost, and Ctrl-C or the deadline cancels it.
        request_id = self._new_id()
        self._expect(request_id)
        self._send(protocol.model_message(op, request_id, model, timeout, priority))
        deadline = None if timeout is None else time.monotonic() + timeout
        for header, payloads in self._replies(request_id, deadline):
            if header["kind"] == protocol.RESULT:
                return protocol.reply_value(header, payloads)
            if header["kind"] in protocol.TERMINAL_KINDS:
                raise protocol.reply_error(header)
            # progress (or anything else) before the answer: nothing to show here

    def _forget(self, request_id, result=False, reading=None):
        """The request is over (`result`: with its result): drop what is left of it.

        `reading`: the header of its terminal reply, which the caller maps after this;
        a second copy of that reply (a daemon resends its last results to a broker
        that restarted) names the same segments, which must stay for the first.
        """
        self._outstanding.discard(request_id)
        for header, _ in self._mailbox.pop(request_id, ()):
            self._shm.discard(header, keep=reading)
        self._shm.finish(request_id, result)

    def _replies(self, request_id, deadline, grace=m.TIMEOUT_GRACE_S):
        """Yield (header, payloads) for request_id until its terminal reply."""
        try:
            while True:
                box = self._mailbox.get(request_id)
                if box:
                    header, payloads = box.popleft()
                    if header["kind"] in protocol.TERMINAL_KINDS:
                        self._forget(request_id, header["kind"] == protocol.RESULT, header)
                    yield header, payloads
                    if header["kind"] in protocol.TERMINAL_KINDS:
                        return
                    continue
                self._receive_once(request_id, deadline, grace)
        except KeyboardInterrupt:
            self._cancel_after_interrupt(request_id)
            raise

    def _receive_once(self, request_id, deadline, grace):
        now = time.monotonic()
        if deadline is not None and now > deadline + grace:
            self._forget(request_id)
            self.cancel(request_id)
            raise Timeout("no reply within the timeout (and {:.0f}s grace); the broker was "
                          "asked to cancel the request".format(grace))
        if now - self._last_heard > self.broker_timeout:
            self._forget(request_id)
            raise BrokerUnavailable(_curve.explain(
                self._handshake,
                "no answer from the broker at {} for {:.0f}s; is `modelhost up` running?"
                .format(self.endpoint, now - self._last_heard)))
        if now - self._last_ping >= protocol.HEARTBEAT_S:
            # Pings keep this client alive in the broker's eyes while it waits
            # and reveal a request that a restarted broker no longer knows.
            self._last_ping = now
            self._send(self._pings.frames(self._outstanding))
        wait = protocol.HEARTBEAT_S
        if deadline is not None:
            wait = min(wait, max(0.0, deadline + grace - now))
        self._wait(wait * 1000)

    def _wait(self, timeout_ms):
        """Take in what arrives within timeout_ms (into the mailboxes)."""
        try:
            if self._poller.poll(timeout_ms):
                self._drain()
        except zmq.ZMQError as exc:
            raise transport_error("receive from", self.endpoint, exc) from exc

    def _drain(self):
        # EVENTS instead of catching zmq.Again: an exception per wakeup costs
        # more than a small call's whole client-side work.
        while protocol.readable(self._socket):
            frames = protocol.recv(self._socket)
            self._last_heard = time.monotonic()
            header, payloads = protocol.decode(frames)
            if header.get("kind") == protocol.PONG:
                self._on_pong(header)
            elif header.get("id") in self._outstanding:
                self._mailbox[header["id"]].append((header, payloads))
            elif "shm" in header:
                self._shm.discard(header)  # a reply nobody waits for any more

    def _on_pong(self, header):
        for request_id in self._pings.lost(header):
            if request_id in self._outstanding and not self._mailbox.get(request_id):
                self._mailbox[request_id].append((m.lost_reply(request_id), []))

    def _cancel_after_interrupt(self, request_id):
        if request_id not in self._outstanding:
            return
        self.cancel(request_id)
        deadline = time.monotonic() + m.CANCEL_GRACE_S
        try:
            while request_id in self._outstanding and time.monotonic() < deadline:
                box = self._mailbox.get(request_id)
                if box and box[-1][0]["kind"] in protocol.TERMINAL_KINDS:
                    break
                self._wait(100)
        finally:
            self._forget(request_id)
