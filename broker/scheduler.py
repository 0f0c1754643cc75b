"""The broker's scheduler: queues, dispatch, cancellation, deadlines, crashes.

Pure and synchronous: events come in through `on_*` methods, side effects go
out through an `Effects` object, and time comes from an injected clock. It
opens no socket and never sleeps, so tests drive it decision by decision.

Contracts:
- every request accepted by `on_call` ends with exactly one terminal effect
  (`reply_error`, `reply_cancelled`, or a forwarded terminal reply from the
  daemon), unless its client went away, in which case nothing is sent.
- a request answered early (timeout, cancel) while running keeps its
  concurrency slot until the daemon itself says the call is over, and
  whatever the daemon sends for it afterwards is dropped.
"""

from __future__ import annotations

import enum
import heapq
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from modelhost.protocol import DaemonState, Priority

log = logging.getLogger("modelhost.broker")

RequestKey = tuple[bytes, Any]  # (client identity, request id)

DISPATCH_RETRY_S = 0.05
# How many calls answered `daemon_crashed` are remembered, to drop late replies.
ABANDONED_REMEMBERED = 4096


class RequestState(enum.Enum):
    QUEUED = "queued"  # waiting in its daemon's queue
    RUNNING = "running"  # handed to the daemon
    ANSWERED = "answered"  # client has its terminal reply; the daemon has not finished yet


@dataclass(eq=False)
class Request:
    client: bytes
    id: Any
    model: str
    method: str
    # The header the daemon gets (method, args, stream) and the payload frames,
    # kept as received so the broker never copies them.
    forward: dict
    payloads: list
    payload_bytes: int = 0
    priority: str = Priority.NORMAL
    deadline: float | None = None
    state: RequestState = RequestState.QUEUED
    enqueued_at: float = 0.0
    slot: int | None = None  # index of the daemon's slot running it

    @property
    def key(self) -> RequestKey:
        return (self.client, self.id)


@dataclass
class DaemonLimits:
    concurrency: int = 1
    max_queue: int = 64
    max_payload_bytes: int = 256 * 2**20


@dataclass(eq=False)
class Daemon:
    name: str
    limits: DaemonLimits
    state: str = DaemonState.STARTING
    identity: bytes | None = None  # routing id of its control socket, once registered
    # Routing ids of its call slots: one call at a time each, on its own socket.
    slots: list = field(default_factory=list)
    # After a dispatch to a slot that is not connected yet: when to try again.
    retry_at: float = 0.0
    pid: int | None = None
    interpreter: str | None = None
    python: str | None = None
    engine: str | None = None
    methods: list | None = None  # None until registered: then calls are checked here
    facts: dict = field(default_factory=dict)
    loads: int = 0
    error: str | None = None
    started_at: float | None = None  # monotonic; uptime in ps
    last_seen: float = 0.0
    queues: dict = field(default_factory=lambda: {p: deque() for p in Priority.ALL})
    running: dict = field(default_factory=dict)  # RequestKey -> Request
    process: dict = field(default_factory=dict)  # what the supervisor reports

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def serving(self) -> bool:
        return self.identity is not None and self.state == DaemonState.READY


class Effects(Protocol):
    # False when the request's slot is not connected (yet): it is queued again.
    def dispatch(self, daemon: Daemon, request: Request) -> bool | None: ...
    def cancel_remote(self, daemon: Daemon, request: Request) -> None: ...
    def reply_error(self, request: Request, code: str, message: str) -> None: ...
    def reply_cancelled(self, request: Request, message: str) -> None: ...


class Scheduler:
    def __init__(self, limits: dict[str, DaemonLimits], effects: Effects,
                 clock: Callable[[], float], *, daemon_expiry_s: float = 3.0,
                 client_expiry_s: float = 10.0):
        self.daemons = {name: Daemon(name, lim) for name, lim in limits.items()}
        self.effects = effects
        self.clock = clock
        self.daemon_expiry_s = daemon_expiry_s
        self.client_expiry_s = client_expiry_s
        self.requests: dict[RequestKey, Request] = {}
        # client identity -> last time it said anything; a silent client's
        # queued work is dropped so nobody computes for a dead process.
        self.clients: dict[bytes, float] = {}
        # (deadline, tie-breaker, request): the request itself, so a deadline
        # can never hit a later request that reuses a finished one's id.
        self._deadlines: list[tuple[float, int, Request]] = []
        # Calls answered `daemon_crashed` whose daemon may only have been
        # silent: a late word from it must not become a second terminal reply.
        self._abandoned: OrderedDict[RequestKey, None] = OrderedDict()
        self._deadline_seq = 0

    # --- client events -------------------------------------------------------

    def on_client_seen(self, client: bytes) -> None:
        self.clients[client] = self.clock()

    def on_call(self, request: Request) -> None:
        daemon = self.daemons.get(request.model)
        if request.key in self.requests:
            self.effects.reply_error(request, "bad_message", "request id {!r} is already in "
                                     "use by this client; use a new id per request"
                                     .format(request.id))
            return
        if daemon is None:
            self.effects.reply_error(request, "unknown_model", "no model named {!r}; this "
                                     "broker serves: {}".format(request.model,
                                                                ", ".join(self.daemons) or "none"))
            return
        if daemon.state in (DaemonState.FAILED, DaemonState.STOPPED):
            self.effects.reply_error(request, "daemon_unavailable", "daemon {} is {}: {}"
                                     .format(daemon.name, daemon.state,
                                             daemon.error or "see `modelhost ps`"))
            return
        if daemon.methods is not None and request.method not in daemon.methods:
            self.effects.reply_error(request, "unknown_method", "{} has no method {!r}; it "
                                     "offers: {}".format(daemon.name, request.method,
                                                         ", ".join(daemon.methods)))
            return
        if request.payload_bytes > daemon.limits.max_payload_bytes:
            self.effects.reply_error(request, "payload_too_large", "the request carries {} "
                                     "bytes of payload; {} accepts at most {} (max_payload in "
                                     "its config)".format(request.payload_bytes, daemon.name,
                                                          daemon.limits.max_payload_bytes))
            return
        if daemon.queued() >= daemon.limits.max_queue:
            self.effects.reply_error(request, "over_capacity", "{} already has {} calls "
                                     "queued (max_queue); retry later or raise max_queue"
                                     .format(daemon.name, daemon.queued()))
            return
        request.enqueued_at = self.clock()
        request.state = RequestState.QUEUED
        self.requests[request.key] = request
        daemon.queues[request.priority].append(request)
        if request.deadline is not None:
            self._deadline_seq += 1
            heapq.heappush(self._deadlines, (request.deadline, self._deadline_seq, request))
        self._pump(daemon)

    def on_cancel(self, client: bytes, request_id: Any) -> None:
        request = self.requests.get((client, request_id))
        if request is None or request.state is RequestState.ANSWERED:
            return  # already over: its terminal reply is sent or on its way
        daemon = self.daemons[request.model]
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.effects.reply_cancelled(request, "cancelled before it started")
        else:
            # The daemon stops cooperatively and answers `cancelled` itself.
            self.effects.cancel_remote(daemon, request)

    def knows(self, client: bytes, request_id: Any) -> bool:
        request = self.requests.get((client, request_id))
        return request is not None and request.state is not RequestState.ANSWERED

    # --- daemon events -------------------------------------------------------

    def on_daemon_registered(self, name: str, identity: bytes, info: dict) -> Daemon | None:
        daemon = self.daemons.get(name)
        if daemon is None:
            return None
        if daemon.identity not in (None, identity):
            # The same name under a new connection: the old process is gone.
            self._fail_running(daemon, "daemon {} was replaced by a new process".format(name))
        now = self.clock()
        daemon.identity = identity
        daemon.last_seen = now
        daemon.pid = info.get("pid")
        daemon.interpreter = info.get("interpreter")
        daemon.python = info.get("python")
        daemon.engine = info.get("engine")
        daemon.methods = list(info.get("methods") or [])
        daemon.slots = list(info.get("slots") or [identity] * daemon.limits.concurrency)
        daemon.retry_at = 0.0
        daemon.started_at = now - float(info.get("uptime_s") or 0.0)
        self._apply_state(daemon, info)
        for call in info.get("running") or []:
            self._adopt(daemon, call)
        self._pump(daemon)
        return daemon

    def on_daemon_state(self, name: str, update: dict) -> None:
        daemon = self.daemons[name]
        daemon.last_seen = self.clock()
        self._apply_state(daemon, update)
        if daemon.state == DaemonState.FAILED:
            self._fail_queued(daemon, "daemon_unavailable", "daemon {} failed: {}".format(
                name, daemon.error))
        self._pump(daemon)

    def on_daemon_seen(self, name: str) -> None:
        self.daemons[name].last_seen = self.clock()

    def on_reply(self, name: str | None, client: bytes, request_id: Any,
                 terminal: bool) -> bool:
        """A daemon's reply for a call; True when it should be forwarded to the client."""
        request = self.requests.get((client, request_id))
        if request is None:
            if (client, request_id) in self._abandoned:
                return False  # its caller already has `daemon_crashed`
            # Unknown here (this broker restarted mid-call): the daemon's word
            # is the only copy of the answer, so pass it on.
            return True
        forward = request.state is RequestState.RUNNING
        if terminal:
            self._finish(request)
            if name is not None:
                self._pump(self.daemons[name])
        return forward

    def on_daemon_lost(self, name: str, reason: str) -> None:
        """The daemon's process died or fell silent: fail its calls, wait for its restart."""
        daemon = self.daemons[name]
        if daemon.identity is None:
            return
        log.warning("daemon=%s lost: %s", name, reason)
        daemon.identity = None
        daemon.state = DaemonState.CRASHED
        daemon.error = reason
        daemon.started_at = None
        self._fail_running(daemon, "daemon {} (pid {}) died during the call: {}; it is being "
                           "restarted, send the request again".format(name, daemon.pid, reason))

    def on_supervisor_report(self, processes: dict) -> None:
        """Process facts from `modelhost up`: restarts, start failures, stderr tails."""
        for name, process in processes.items():
            daemon = self.daemons.get(name)
            if daemon is None:
                continue
            daemon.process = process
            if daemon.identity is not None:
                continue
            status = process.get("status")
            if status == "failed":
                daemon.state = DaemonState.FAILED
                daemon.error = process.get("error")
                self._fail_queued(daemon, "daemon_unavailable", "daemon {} failed to start: {}"
                                  .format(name, daemon.error))
            elif status == "stopped":
                daemon.state = DaemonState.STOPPED
                self._fail_queued(daemon, "daemon_unavailable", "daemon {} is stopped".format(name))
            elif status == "backoff":
                daemon.state = DaemonState.CRASHED
            elif status == "running" and daemon.state in (DaemonState.STOPPED, DaemonState.FAILED,
                                                          DaemonState.CRASHED):
                daemon.state = DaemonState.STARTING

    # --- time ---------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        while self._deadlines and self._stale_deadline(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        times = [d.retry_at for d in self.daemons.values() if d.retry_at]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        return min(times, default=None)

    def on_tick(self) -> None:
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)
            if not self._stale_deadline(entry):
                self._expire(entry[2])
        for daemon in self.daemons.values():
            if daemon.identity is not None and now - daemon.last_seen > self.daemon_expiry_s:
                self.on_daemon_lost(daemon.name, "no heartbeat for {:.1f}s".format(
                    now - daemon.last_seen))
            elif daemon.retry_at and now >= daemon.retry_at:
                daemon.retry_at = 0.0
                self._pump(daemon)
        for client, seen in list(self.clients.items()):
            if now - seen > self.client_expiry_s:
                self._drop_client(client)

    # --- queries -------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        now = self.clock()
        rows = []
        for daemon in self.daemons.values():
            state = daemon.state
            if state == DaemonState.READY and daemon.running:
                state = DaemonState.BUSY
            rows.append({
                "name": daemon.name,
                "state": state,
                "pid": daemon.pid if daemon.identity is not None else daemon.process.get("pid"),
                "interpreter": daemon.interpreter,
                "python": daemon.python,
                "engine": daemon.engine,
                "methods": daemon.methods,
                "uptime_s": None if daemon.started_at is None else now - daemon.started_at,
                "queued": daemon.queued(),
                "running": len(daemon.running),
                "concurrency": daemon.limits.concurrency,
                "max_queue": daemon.limits.max_queue,
                "loads": daemon.loads,
                "restarts": daemon.process.get("restarts", 0),
                "last_error": daemon.error,
                "facts": daemon.facts,
            })
        return rows

    # --- internals -----------------------------------------------------------

    def _apply_state(self, daemon: Daemon, update: dict) -> None:
        if update.get("state"):
            daemon.state = update["state"]
        if "error" in update:
            daemon.error = update.get("error")
        if update.get("facts") is not None:
            daemon.facts = update["facts"]
        if update.get("loads") is not None:
            daemon.loads = update["loads"]

    def _adopt(self, daemon: Daemon, call: dict) -> None:
        """A call still running in a daemon that registers with a restarted broker."""
        key = (call.get("client"), call.get("id"))
        if key in self.requests or key in self._abandoned or not isinstance(key[0], bytes):
            return
        slot = call.get("slot")
        free = self._free_slots(daemon)
        if slot not in free:
            # A register that does not say which slot: take the first free one
            # so the call still counts against the concurrency limit.
            slot = free[0] if free else None
        request = Request(client=key[0], id=key[1], model=daemon.name,
                          method=call.get("method") or "?", forward={}, payloads=[],
                          state=RequestState.RUNNING, enqueued_at=self.clock(), slot=slot)
        self.requests[key] = request
        daemon.running[key] = request

    def _pump(self, daemon: Daemon) -> None:
        """Dispatch queued calls to the daemon's free slots."""
        if not daemon.serving or self.clock() < daemon.retry_at:
            return
        for slot in self._free_slots(daemon):
            request = self._next_queued(daemon)
            if request is None:
                return
            request.state = RequestState.RUNNING
            request.slot = slot
            daemon.running[request.key] = request
            if self.effects.dispatch(daemon, request) is False:
                # The slot's socket has not connected yet (a daemon that just
                # registered, or a broker that just restarted): try shortly.
                del daemon.running[request.key]
                request.state = RequestState.QUEUED
                request.slot = None
                daemon.queues[request.priority].appendleft(request)
                daemon.retry_at = self.clock() + DISPATCH_RETRY_S
                return

    @staticmethod
    def _free_slots(daemon: Daemon) -> list[int]:
        busy = {request.slot for request in daemon.running.values()}
        return [index for index in range(min(len(daemon.slots), daemon.limits.concurrency))
                if index not in busy]

    def _next_queued(self, daemon: Daemon) -> Request | None:
        for priority in Priority.ALL:
            queue = daemon.queues[priority]
            if queue:
                return queue.popleft()
        return None

    def _unqueue(self, daemon: Daemon, request: Request) -> None:
        daemon.queues[request.priority].remove(request)
        self.requests.pop(request.key, None)

    def _finish(self, request: Request) -> None:
        self.requests.pop(request.key, None)
        daemon = self.daemons.get(request.model)
        if daemon is not None:
            daemon.running.pop(request.key, None)

    def _expire(self, request: Request) -> None:
        daemon = self.daemons[request.model]
        message = "the call did not finish within its timeout"
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.effects.reply_error(request, "timeout", message + " (it was still queued; "
                                     "{} has {} running and {} queued)".format(
                                         daemon.name, len(daemon.running), daemon.queued()))
            return
        request.state = RequestState.ANSWERED
        self.effects.reply_error(request, "timeout", message + "; the daemon was told to "
                                 "stop it")
        self.effects.cancel_remote(daemon, request)

    def _fail_running(self, daemon: Daemon, message: str) -> None:
        for request in list(daemon.running.values()):
            if request.state is RequestState.RUNNING:
                self.effects.reply_error(request, "daemon_crashed", message)
            self._finish(request)
            self._abandoned[request.key] = None
            while len(self._abandoned) > ABANDONED_REMEMBERED:
                self._abandoned.popitem(last=False)

    def _fail_queued(self, daemon: Daemon, code: str, message: str) -> None:
        for queue in daemon.queues.values():
            while queue:
                request = queue.popleft()
                self.requests.pop(request.key, None)
                self.effects.reply_error(request, code, message)

    def _drop_client(self, client: bytes) -> None:
        del self.clients[client]
        for request in [r for r in self.requests.values() if r.client == client]:
            daemon = self.daemons[request.model]
            if request.state is RequestState.QUEUED:
                log.info("daemon=%s rid=%s dropped: its client went away", daemon.name, request.id)
                self._unqueue(daemon, request)
            elif request.state is RequestState.RUNNING:
                log.info("daemon=%s rid=%s cancelled: its client went away", daemon.name,
                         request.id)
                request.state = RequestState.ANSWERED
                self.effects.cancel_remote(daemon, request)

    def _stale_deadline(self, entry: tuple[float, int, Request]) -> bool:
        request = entry[2]
        return (self.requests.get(request.key) is not request
                or request.state is RequestState.ANSWERED)
