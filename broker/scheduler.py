"""The broker's scheduler: queues, memory admission, tiers, dispatch, crashes.

Pure and synchronous: events come in through `on_*` methods, side effects go
out through an `Effects` object, time comes from an injected clock and memory
from readings handed to `on_memory`. It opens no socket and never sleeps, so
tests drive it decision by decision.

Memory (see broker/DESIGN.md): every daemon holds its footprint at its tier
on one device. A call starts only when its daemon is resident and the
call's peak fits under the device's threshold, counting every daemon's
footprint (or what the probe measures of it, whichever is larger), every
running call's peak, and memory held by other processes where configured.
When it does not fit, the first waiting call on that device moves idle
daemons down the tiers (placement.py), and waits for the probe to confirm.

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

from modelhost.protocol import MOVING_STATE, STATE_OF_TIER, DaemonState, Priority, Tier

from .accounting import MemoryBook
from .footprints import Footprint
from .memory import DeviceMemory, MemoryReading, format_bytes
from .placement import DEPTH, Candidate, plan_room

log = logging.getLogger("modelhost.broker")

PRIORITY_INDEX = {priority: index for index, priority in enumerate(Priority.ALL)}
LOWEST_RANK = len(Priority.ALL) - 1
INTERACTIVE = PRIORITY_INDEX[Priority.INTERACTIVE]
# While a call waits for memory, the queue is looked at again this often:
# aging and the priority window change what may be evicted, with no event.
WAIT_RECHECK_S = 0.25
# Daemon states while an engine moves between tiers.
TRANSITIONAL = frozenset((DaemonState.LOADING, DaemonState.OFFLOADING,
                          DaemonState.ONLOADING, DaemonState.UNLOADING))
FRESH_S = 5.0
# A move down that frees less than this share of what it should is reported.
SHORTFALL_SHARE = 0.5
# What the supervisor must have said lately for the broker to stop processes.
SUPERVISOR_FRESH_S = 3.0

# Outcomes of trying to start the first queued request of a daemon.
STARTED, BLOCKED, WAITING_MEMORY, ANSWERED = "started", "blocked", "waiting", "answered"

RequestKey = tuple[bytes, Any]  # (client identity, request id)

DISPATCH_RETRY_S = 0.05
# How many calls answered `daemon_crashed` are remembered, to drop late replies.
ABANDONED_REMEMBERED = 4096


def _cause(request: Request) -> str:
    """Why a daemon is loaded for this request, as a metrics label."""
    return "load" if request.action == Action.LOAD else "request"


class RequestState(enum.Enum):
    QUEUED = "queued"  # waiting in its daemon's queue
    RUNNING = "running"  # handed to the daemon
    ANSWERED = "answered"  # client has its terminal reply; the daemon has not finished yet


class Action:
    """What a queued request asks for: a call of the engine, or its daemon at a tier."""

    CALL = "call"
    LOAD = "load"  # answered once the daemon is resident
    UNLOAD = "unload"  # answered once the daemon is unloaded (after its calls drain)


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
    started_at: float | None = None  # handed to its daemon: queue time ends, run time begins
    slot: int | None = None  # index of the daemon's slot running it
    # Routing id of that slot's socket: only it may answer for the call, so no
    # other peer on the daemon socket can deliver a result in its name.
    sender: bytes | None = None
    action: str = Action.CALL
    seq: int = 0  # arrival order, for first-come first-served among equals
    # Times a later call started while this one waited for memory.
    skips: int = 0
    # Memory while running: bytes reserved for its peak, what its daemon held
    # when it started, and the most the probe saw the daemon hold during it.
    reserved: int = 0
    base_usage: int = 0
    base_cuda: int | None = None
    peak_seen: int = 0

    @property
    def key(self) -> RequestKey:
        return (self.client, self.id)


@dataclass
class DaemonLimits:
    """A daemon's settings from the configuration, as the scheduler needs them."""

    concurrency: int = 1
    max_queue: int = 64
    max_payload_bytes: int = 256 * 2**20
    device: str | None = None  # None: the first device the probe reports
    pinned: bool = False
    idle_ttl_s: float | None = None
    preload: bool = True
    declared_resident: int | None = None
    declared_peak: int | None = None
    priority: str | None = None  # the most urgent work it serves, known in advance


@dataclass(frozen=True)
class MemoryPolicy:
    aging_s: float = 30.0  # a waiting request rises one priority class per aging_s
    max_skips: int = 4  # times a request waiting for memory may be overtaken
    priority_window_s: float = 60.0  # how long a daemon ranks with the work it served
    # device id -> its limit (budget(total), describe(total), external); None:
    # every device unlimited (a broker without memory management).
    limit_for: Callable[[str], Any] | None = None


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
    # Pids of its processes that got past their first load (latest last): the
    # supervisor learns readiness here, so a process that is ready only
    # between two of its polls and then crashes is not taken for a failed start.
    ready_pids: deque = field(default_factory=lambda: deque(maxlen=4))
    # --- memory ---
    footprint: Footprint = field(default_factory=Footprint)
    tier: str = Tier.STOPPED
    tiers: tuple = (Tier.RESIDENT, Tier.UNLOADED)  # what its engine supports
    target: str | None = None  # the tier it is moving to, until it says it is there
    pinned: bool = False
    want_stopped: bool = False  # its process was stopped to free memory
    preload_tried: bool = False  # per process: preload once, when it registers
    last_used: float = 0.0  # end of its last call (or load): recency and idle TTL
    served: dict = field(default_factory=dict)  # priority -> last time it served one
    unload_waiters: list = field(default_factory=list)  # UNLOAD requests
    mem: dict = field(default_factory=dict)  # the daemon's own last memory report
    evictions: int = 0
    moves: dict = field(default_factory=dict)  # tier -> moves that arrived there
    usage_before_move: int = 0  # to judge what a move down really freed
    # When it became resident for waiting work; until that work has started
    # (or FRESH_S passed) only interactive work may evict it again, so a
    # load is not thrown away before it served what it was made for.
    fresh_since: float | None = None

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
    def reply_result(self, request: Request, value: Any) -> None: ...
    # Memory tiers: a command to the daemon, or (stopped) to its supervisor.
    def set_tier(self, daemon: Daemon, tier: str) -> None: ...
    def set_process(self, daemon: Daemon, running: bool) -> None: ...
    # Something people watch for happened (broker/events.py lists the kinds).
    def event(self, kind: str, daemon: str | None, **fields: Any) -> None: ...


class Scheduler:
    def __init__(self, limits: dict[str, DaemonLimits], effects: Effects,
                 clock: Callable[[], float], *, daemon_expiry_s: float = 3.0,
                 client_expiry_s: float = 10.0, policy: MemoryPolicy | None = None,
                 footprints: dict[str, Footprint] | None = None,
                 pins: dict[str, bool] | None = None):
        self.daemons = {name: Daemon(name, lim) for name, lim in limits.items()}
        for name, daemon in self.daemons.items():
            if footprints is not None and name in footprints:
                daemon.footprint = footprints[name]
            daemon.footprint.declared_resident = daemon.limits.declared_resident
            daemon.footprint.declared_peak = daemon.limits.declared_peak
            daemon.pinned = (pins or {}).get(name, daemon.limits.pinned)
        self.effects = effects
        self.clock = clock
        self.daemon_expiry_s = daemon_expiry_s
        self.client_expiry_s = client_expiry_s
        self.policy = policy or MemoryPolicy()
        self.book = MemoryBook(self.daemons, self.policy.limit_for)
        self._preload_due = False  # a daemon registered: see whether it preloads
        self.supervisor_seen = float("-inf")
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
        self._arrivals = 0
        self._waiting = False  # some request waits for memory: look again soon
        self._dirty = False  # a footprint or pin changed: the broker saves them

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
        is_call = request.action == Action.CALL
        # A failed daemon still takes a load (it retries); a stopped one that
        # the memory manager did not stop has nobody to start it.
        unavailable = (DaemonState.FAILED, DaemonState.STOPPED) if is_call else \
            (DaemonState.STOPPED,) if request.action == Action.LOAD else ()
        if daemon.identity is None and daemon.process.get("final"):
            unavailable = (DaemonState.FAILED,) + unavailable  # no process will ever come
        if daemon.state in unavailable and not daemon.want_stopped:
            self.effects.reply_error(request, "daemon_unavailable", "daemon {} is {}: {}"
                                     .format(daemon.name, daemon.state,
                                             daemon.error or "see `modelhost ps`"))
            return
        if is_call and daemon.methods is not None and request.method not in daemon.methods:
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
        if request.action == Action.UNLOAD and daemon.pinned:
            self.effects.reply_error(request, "bad_arguments", "{} is pinned, so it stays "
                                     "loaded; unpin it first (modelhost unpin {})".format(
                                         daemon.name, daemon.name))
            return
        # A call that can start right away fits; one that will wait learns
        # now, not at the head of the queue, that it never could.
        starts_now = (daemon.serving and daemon.target is None and not daemon.queued()
                      and len(daemon.running) < daemon.limits.concurrency)
        if request.action != Action.UNLOAD and not starts_now:
            never = self._never_fits(daemon, request)
            if never:
                self.effects.reply_error(request, "insufficient_memory", never)
                return
        request.enqueued_at = self.clock()
        self._arrivals += 1
        request.seq = self._arrivals
        request.state = RequestState.QUEUED
        self.requests[request.key] = request
        if request.action == Action.UNLOAD:
            daemon.unload_waiters.append(request)
        else:
            daemon.queues[request.priority].append(request)
        if request.deadline is not None:
            self._deadline_seq += 1
            heapq.heappush(self._deadlines, (request.deadline, self._deadline_seq, request))
        self._pump()

    def on_cancel(self, client: bytes, request_id: Any) -> None:
        request = self.requests.get((client, request_id))
        if request is None or request.state is RequestState.ANSWERED:
            return  # already over: its terminal reply is sent or on its way
        daemon = self.daemons[request.model]
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.effects.reply_cancelled(request, "cancelled before it started")
            self._pump()
        else:
            # The daemon stops cooperatively and answers `cancelled` itself.
            self.effects.cancel_remote(daemon, request)

    def request_from(self, sender: bytes, client: bytes, request_id: Any) -> Request | None:
        """The running request `sender` may answer for, or None."""
        request = self.requests.get((client, request_id))
        if request is None or request.sender not in (None, sender):
            return None
        return request

    def knows(self, client: bytes, request_id: Any) -> bool:
        request = self.requests.get((client, request_id))
        return request is not None and request.state is not RequestState.ANSWERED

    def set_pinned(self, name: str, pinned: bool) -> Daemon:
        daemon = self.daemons[name]
        if daemon.pinned != pinned:
            daemon.pinned = pinned
            self._dirty = True
            log.info("daemon=%s %s", name, "pinned: never evicted" if pinned else "unpinned")
            self._pump()
        return daemon

    # --- daemon events -------------------------------------------------------

    def on_daemon_registered(self, name: str, identity: bytes, info: dict) -> Daemon | None:
        daemon = self.daemons.get(name)
        if daemon is None:
            return None
        if daemon.identity not in (None, identity):
            # The same name under a new connection: the old process is gone.
            self._fail_running(daemon, "daemon {} was replaced by a new process".format(name))
        now = self.clock()
        if daemon.identity != identity:
            daemon.preload_tried = False  # a new process, or a restarted broker
            self._preload_due = True
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
        daemon.want_stopped = False
        daemon.tiers = tuple(info.get("tiers") or (Tier.RESIDENT, Tier.UNLOADED))
        if not daemon.last_used:
            daemon.last_used = now
        tier = info.get("tier")
        if tier not in Tier.ALL:
            # A runtime that does not speak of tiers is loaded when ready.
            tier = Tier.RESIDENT if info.get("state") in (DaemonState.READY,
                                                         DaemonState.BUSY) else Tier.UNLOADED
        daemon.tier = tier
        target = daemon.target
        daemon.target = None
        self._apply_state(daemon, info)
        for call in info.get("running") or []:
            self._adopt(daemon, call)
        if target == Tier.RESIDENT and daemon.tier != Tier.RESIDENT:
            # Started to serve a waiting request: its room is still reserved.
            self._move(daemon, Tier.RESIDENT, "started for a waiting request", "request")
        self._pump()
        self._note_ready(daemon)
        return daemon

    def on_daemon_state(self, name: str, update: dict) -> None:
        daemon = self.daemons[name]
        daemon.last_seen = self.clock()
        self._apply_state(daemon, update)
        tier = update.get("tier")
        if tier not in Tier.ALL:
            # A runtime that does not name its tier: its state says it.
            tier = next((t for t, s in STATE_OF_TIER.items() if s == daemon.state), daemon.tier)
        daemon.tier = tier
        if daemon.state not in TRANSITIONAL and daemon.target is not None:
            self._arrived(daemon, daemon.target, update)
        if daemon.state == DaemonState.FAILED:
            self.effects.event("error", name, level="error", rid=None, code="load_failed",
                               message=str(daemon.error))
            self._fail_queued(daemon, "daemon_unavailable", "daemon {} failed: {}".format(
                name, daemon.error))
        self._pump()
        self._note_ready(daemon)

    def on_daemon_seen(self, name: str, mem: dict | None = None) -> None:
        daemon = self.daemons[name]
        daemon.last_seen = self.clock()
        if mem is not None:
            daemon.mem = mem

    def on_reply(self, name: str | None, client: bytes, request_id: Any,
                 terminal: bool, mem: dict | None = None, sender: bytes | None = None) -> bool:
        """A daemon's reply for a call; True when it should be forwarded to the client.

        `sender` is the socket it came from: a reply for a call from any socket
        but the slot the call was dispatched to is refused.
        """
        request = self.requests.get((client, request_id))
        if request is not None and sender is not None and request.sender is not None \
                and sender != request.sender:
            log.warning("daemon=%s rid=%s refused a reply from %r: the call runs on %r",
                        request.model, request_id, sender, request.sender)
            return False
        if request is None:
            if (client, request_id) in self._abandoned:
                return False  # its caller already has `daemon_crashed`
            # Unknown here (this broker restarted mid-call): the daemon's word
            # is the only copy of the answer, so pass it on.
            return True
        forward = request.state is RequestState.RUNNING
        if terminal:
            daemon = self.daemons.get(request.model)
            if daemon is not None and request.key in daemon.running:
                self._call_ended(daemon, request, mem)
            self._finish(request)
            self._pump()
        return forward

    def on_daemon_lost(self, name: str, reason: str) -> None:
        """The daemon's process died or fell silent: fail its calls, wait for its restart."""
        daemon = self.daemons[name]
        if daemon.identity is None:
            return
        daemon.identity = None
        daemon.started_at = None
        daemon.tier = Tier.STOPPED
        if daemon.target == Tier.STOPPED:
            # The stop the memory manager asked for: the memory is back.
            log.info("daemon=%s stopped to free memory", name)
            daemon.target = None
            daemon.moves[Tier.STOPPED] = daemon.moves.get(Tier.STOPPED, 0) + 1
            self.effects.event("moved", name, tier=Tier.STOPPED, took_s=None, failed=False,
                               memory_bytes=None)
            daemon.state = DaemonState.STOPPED
            daemon.error = None
            self._fail_running(daemon, "daemon {} was stopped".format(name))
            self._answer_unload_waiters(daemon)
            self._pump()
            return
        log.warning("daemon=%s lost: %s", name, reason)
        self.effects.event("error", name, level="error", rid=None, code="daemon_crashed",
                           message="lost: " + reason)
        daemon.target = None
        daemon.state = DaemonState.CRASHED
        daemon.error = reason
        self._fail_running(daemon, "daemon {} (pid {}) died during the call: {}; it is being "
                           "restarted, send the request again".format(name, daemon.pid, reason))
        self._fail_unload_waiters(daemon, reason)
        self._pump()

    def on_supervisor_report(self, processes: dict) -> None:
        """Process facts from `modelhost up`: restarts, start failures, stderr tails."""
        self.supervisor_seen = self.clock()
        for name, process in processes.items():
            daemon = self.daemons.get(name)
            if daemon is None:
                continue
            daemon.process = process
            if daemon.identity is not None:
                continue
            status = process.get("status")
            if status == "failed" and process.get("exited_pid") in daemon.ready_pids:
                # That process was ready, then died: a crash, which the
                # supervisor restarts; queued calls wait for it.
                status = "backoff"
            if daemon.want_stopped:
                if status == "stopped":
                    daemon.state = DaemonState.STOPPED
                continue
            if status == "failed":
                if daemon.state != DaemonState.FAILED:
                    self.effects.event("error", name, level="error", rid=None,
                                       code="start_failed", message=str(process.get("error")))
                daemon.state = DaemonState.FAILED
                daemon.error = process.get("error")
                self._fail_queued(daemon, "daemon_unavailable", "daemon {} failed to start: {}"
                                  .format(name, daemon.error))
            elif status == "stopped" and daemon.target != Tier.RESIDENT:
                daemon.state = DaemonState.STOPPED
                self._fail_queued(daemon, "daemon_unavailable", "daemon {} is stopped".format(name))
            elif status == "backoff":
                daemon.state = DaemonState.CRASHED
            elif status in ("running", "starting", "pending") and daemon.state in (
                    DaemonState.STOPPED, DaemonState.FAILED, DaemonState.CRASHED):
                daemon.state = DaemonState.STARTING

    def on_memory(self, reading: MemoryReading) -> None:
        """A fresh probe reading: peaks of running calls, idle footprints, then admission."""
        self.book.update(reading)
        for daemon in self.daemons.values():
            measured = self.book.measured(daemon)
            if measured is None:
                continue
            for request in daemon.running.values():
                request.peak_seen = max(request.peak_seen, measured)
            if daemon.tier == Tier.RESIDENT and daemon.state == DaemonState.READY \
                    and not daemon.running and daemon.target is None:
                self._remember(daemon, Tier.RESIDENT, measured)
        self._pump()

    # --- time ---------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        while self._deadlines and self._stale_deadline(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        times = [d.retry_at for d in self.daemons.values() if d.retry_at]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._waiting:
            times.append(self.clock() + WAIT_RECHECK_S)
        for daemon in self.daemons.values():
            expiry = self._ttl_expiry(daemon)
            if expiry is not None:
                times.append(expiry)
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
            expiry = self._ttl_expiry(daemon)
            if expiry is not None and now >= expiry:
                self._move(daemon, Tier.UNLOADED, "idle for {:.0f}s (idle_ttl_s)".format(
                    now - daemon.last_used), "idle_ttl")
        for client, seen in list(self.clients.items()):
            if now - seen > self.client_expiry_s:
                self._drop_client(client)
        self._pump()

    def take_dirty(self) -> bool:
        """Whether footprints or pins changed since the last call (the broker saves them)."""
        dirty, self._dirty = self._dirty, False
        return dirty

    # --- queries -------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        now = self.clock()
        rows = []
        for daemon in self.daemons.values():
            state = self._shown_state(daemon)
            expiry = self._ttl_expiry(daemon)
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
                "tier": daemon.tier,
                "target": daemon.target,
                "tiers": list(daemon.tiers),
                "device": self.book.device_id(daemon),
                "pinned": daemon.pinned,
                "memory_bytes": self.book.measured(daemon),
                "footprint": daemon.footprint.describe(),
                "idle_ttl_s": daemon.limits.idle_ttl_s,
                "ttl_s": None if expiry is None else max(0.0, expiry - now),
                "evictions": daemon.evictions,
                "moves": dict(daemon.moves),
                "ready_pids": list(daemon.ready_pids),
            })
        return rows

    def _shown_state(self, daemon: Daemon) -> str:
        state = daemon.state
        if state == DaemonState.READY and daemon.running:
            state = DaemonState.BUSY
        if daemon.target is not None and daemon.identity is not None \
                and state not in TRANSITIONAL:
            # Ordered, not yet begun: say so, or a load looks like idleness.
            state = MOVING_STATE.get((daemon.tier, daemon.target), state)
        return state

    def _note_ready(self, daemon: Daemon) -> None:
        """Remember its process as ready once registered and past the load ordered
        when it came up (if there was room for one), as `ps` would show it."""
        if daemon.identity is None or not daemon.pid or daemon.pid in daemon.ready_pids:
            return
        if self._shown_state(daemon) not in (DaemonState.STARTING, DaemonState.LOADING,
                                             DaemonState.CRASHED, DaemonState.STOPPED):
            daemon.ready_pids.append(daemon.pid)

    def device_rows(self) -> list[dict]:
        return self.book.device_rows()

    def row(self, name: str) -> dict:
        return next(row for row in self.snapshot() if row["name"] == name)

    # --- memory ---------------------------------------------------------------

    def _needs(self, daemon: Daemon, request: Request) -> tuple[int, int]:
        """(resident bytes, peak bytes) the request needs of its daemon's device."""
        peak = daemon.footprint.peak(request.method) if request.action == Action.CALL else 0
        return daemon.footprint.at(Tier.RESIDENT), peak

    def _never_fits(self, daemon: Daemon, request: Request) -> str | None:
        """Why the request could not run even with every other daemon evicted, or None."""
        device = self.book.device(daemon)
        limit = self.book.limit(None if device is None else device.id)
        if limit is None:
            return None
        resident, peak = self._needs(daemon, request)
        budget = limit.budget(device.total)
        external = self.book.external(device)
        pinned = [d for d in self.book.on_device(device) if d is not daemon and d.pinned]
        held_by_pinned = sum(self.book.usage(d) for d in pinned)
        room = budget - external - held_by_pinned
        if resident + peak <= room:
            return None
        known = "measured" if daemon.footprint.measured.get(Tier.RESIDENT) is not None \
            else "declared"
        parts = ["{} needs {} ({} resident, {}{}".format(
            daemon.name, format_bytes(resident + peak), format_bytes(resident), known,
            " + {} at the peak of {}".format(format_bytes(peak), request.method) if peak else "")
            + ")",
            "but {} allows {} ({})".format(device.name, format_bytes(budget),
                                           limit.describe(device.total))
            if limit.threshold_bytes is None else
            "but the threshold of {} is {}".format(device.name, format_bytes(budget))]
        if external:
            parts.append("of which {} is held by other processes".format(format_bytes(external)))
        if held_by_pinned:
            parts.append("and {} by pinned daemons ({})".format(
                format_bytes(held_by_pinned), ", ".join(d.name for d in pinned)))
        return ", ".join(parts) + ": it can never fit. Raise memory.threshold, unpin a " \
            "daemon, or lower the daemon's footprint."

    def _rank(self, daemon: Daemon, now: float) -> int:
        """The most urgent priority class the daemon serves lately (0 = interactive)."""
        ranks = [PRIORITY_INDEX[p] for p, queue in daemon.queues.items() if queue]
        if daemon.limits.priority is not None:
            ranks.append(PRIORITY_INDEX[daemon.limits.priority])
        ranks += [PRIORITY_INDEX[p] for p, when in daemon.served.items()
                  if now - when <= self.policy.priority_window_s]
        return min(ranks, default=LOWEST_RANK)

    def _effective_class(self, request: Request, now: float) -> int:
        """The request's priority class, raised one class per aging_s it has waited."""
        aged = int((now - request.enqueued_at) / self.policy.aging_s) \
            if self.policy.aging_s > 0 else 0
        return max(0, PRIORITY_INDEX[request.priority] - aged)

    def _victims(self, device: DeviceMemory, needer: Daemon, rank_at_least: int,
                 now: float) -> list[Candidate]:
        """Idle daemons that a request of class `rank_at_least` may move down."""
        # Reports come every heartbeat (the supervisor's, or systemctl show's).
        can_stop = now - self.supervisor_seen <= max(SUPERVISOR_FRESH_S, self.daemon_expiry_s)
        candidates = []
        for daemon in self.book.on_device(device):
            if (daemon is needer or daemon.pinned or daemon.running or daemon.identity is None
                    or daemon.target is not None or daemon.tier == Tier.STOPPED
                    or daemon.state in TRANSITIONAL or daemon.unload_waiters):
                continue
            rank = self._rank(daemon, now)
            if rank == INTERACTIVE < rank_at_least:
                continue  # it serves the interactive loop; only interactive work evicts it
            if daemon.fresh_since is not None and rank_at_least != INTERACTIVE \
                    and now - daemon.fresh_since < FRESH_S:
                continue  # loaded for work that has not started yet
            usage = self.book.usage(daemon)
            holds = {daemon.tier: usage}
            for tier in Tier.ALL[DEPTH[daemon.tier] + 1:]:
                if tier == Tier.OFFLOADED and Tier.OFFLOADED not in daemon.tiers:
                    continue
                if tier == Tier.STOPPED and not can_stop:
                    continue
                holds[tier] = min(usage, daemon.footprint.at(tier))
            candidates.append(Candidate(daemon.name, daemon.tier, holds, rank,
                                        daemon.last_used, daemon.queued() > 0))
        return candidates

    def _remember(self, daemon: Daemon, tier: str, measured: int) -> None:
        old = daemon.footprint.measured.get(tier)
        if old is None or abs(measured - old) > max(2**20, old // 50):
            daemon.footprint.measured[tier] = measured
            self._dirty = True

    def _ttl_expiry(self, daemon: Daemon) -> float | None:
        ttl = daemon.limits.idle_ttl_s
        if (ttl is None or daemon.pinned or daemon.identity is None or daemon.running
                or daemon.queued() or daemon.target is not None
                or daemon.tier not in (Tier.RESIDENT, Tier.OFFLOADED)
                or daemon.state in TRANSITIONAL):
            return None
        return daemon.last_used + ttl

    # --- tier moves ----------------------------------------------------------

    def _move(self, daemon: Daemon, target: str, reason: str, cause: str) -> None:
        """Order a tier move; `cause` is its kind for metrics: room, idle_ttl, unload,
        load, preload or request."""
        log.info("daemon=%s %s -> %s: %s", daemon.name, daemon.tier, target, reason)
        self.effects.event("move", daemon.name, **{
            "from": daemon.tier, "to": target, "reason": reason, "cause": cause,
            "eviction": DEPTH[target] > DEPTH[daemon.tier]})
        daemon.target = target
        daemon.usage_before_move = self.book.usage(daemon)
        if target == Tier.STOPPED:
            daemon.want_stopped = True
            self.effects.set_process(daemon, False)
        elif daemon.tier == Tier.STOPPED:
            daemon.want_stopped = False
            daemon.state = DaemonState.STARTING
            self.effects.set_process(daemon, True)  # it loads once it registers
        else:
            self.effects.set_tier(daemon, target)

    def _arrived(self, daemon: Daemon, target: str, update: dict) -> None:
        """A move ended (or failed): learn what the tier really holds."""
        daemon.target = None
        now = self.clock()
        measured = self.book.measured(daemon)
        took = update.get("took_s")
        if daemon.tier == target and isinstance(took, (int, float)):
            daemon.footprint.took_s[target] = float(took)
            self._dirty = True
        if daemon.tier == target:
            daemon.moves[target] = daemon.moves.get(target, 0) + 1
        self.effects.event("moved", daemon.name, level="warning" if update.get("failed") else
                           "info", tier=target, took_s=took if isinstance(took, (int, float))
                           else None, failed=daemon.tier != target or bool(update.get("failed")),
                           memory_bytes=measured)
        if target == Tier.RESIDENT and daemon.tier == Tier.RESIDENT:
            daemon.last_used = now
            daemon.fresh_since = now if daemon.queued() else None
            if measured is not None:
                self._remember(daemon, Tier.RESIDENT, measured)
        elif DEPTH[target] > DEPTH[Tier.RESIDENT] and measured is not None:
            # Remember what the tier really holds: a tier that frees nothing
            # is skipped next time, and the planner goes on to a stop.
            expected = daemon.footprint.at(target)
            self._remember(daemon, target, measured)
            should_free = daemon.usage_before_move - expected
            freed = daemon.usage_before_move - measured
            if update.get("failed"):
                log.warning("daemon=%s could not move to %s (%s); it holds %s", daemon.name,
                            target, update.get("error"), format_bytes(measured))
            elif should_free > 0 and freed < should_free * SHORTFALL_SHARE:
                log.warning("daemon=%s moved to %s but freed only %s of %s (it still holds "
                            "%s); remembered, so the next eviction goes further down",
                            daemon.name, target, format_bytes(max(0, freed)),
                            format_bytes(should_free), format_bytes(measured))
        if daemon.tier == Tier.UNLOADED or daemon.state == DaemonState.FAILED:
            self._answer_unload_waiters(daemon)

    def _answer_unload_waiters(self, daemon: Daemon) -> None:
        waiters, daemon.unload_waiters = daemon.unload_waiters, []
        for request in waiters:
            self.requests.pop(request.key, None)
            self.effects.reply_result(request, self.row(daemon.name))

    def _fail_unload_waiters(self, daemon: Daemon, reason: str) -> None:
        waiters, daemon.unload_waiters = daemon.unload_waiters, []
        for request in waiters:
            self.requests.pop(request.key, None)
            self.effects.reply_error(request, "daemon_crashed", "daemon {} was lost while "
                                     "unloading: {}".format(daemon.name, reason))

    def _call_ended(self, daemon: Daemon, request: Request, mem: dict | None) -> None:
        """Learn the call's peak: the probe's samples, and the daemon's own high-water mark."""
        now = self.clock()
        daemon.last_used = now
        daemon.served[request.priority] = now
        if request.action != Action.CALL or request.slot is None:
            return
        extra = request.peak_seen - request.base_usage if request.peak_seen else 0
        device = self.book.device(daemon)
        if isinstance(mem, dict) and device is not None:
            if device.id == "host" and isinstance(mem.get("rss_peak"), int):
                extra = max(extra, mem["rss_peak"] - request.base_usage)
            elif isinstance(mem.get("cuda_peak"), int) and request.base_cuda is not None:
                extra = max(extra, mem["cuda_peak"] - request.base_cuda)
        if request.peak_seen or isinstance(mem, dict):
            daemon.footprint.record_peak(request.method, extra)
            self._dirty = True

    # --- dispatch -------------------------------------------------------------

    def _pump(self) -> None:
        """Start what can start, most urgent first, and make room for what cannot."""
        now = self.clock()
        self._unload_idle(now)
        blocked: set[str] = set()
        waiter: dict[str, Request] = {}  # device id -> first request waiting for memory
        while True:
            best, best_key = None, None
            for daemon in self.daemons.values():
                if daemon.name in blocked:
                    continue
                for queue in daemon.queues.values():
                    if queue:
                        request = queue[0]
                        key = (self._effective_class(request, now), request.seq)
                        if best_key is None or key < best_key:
                            best, best_key = request, key
            if best is None:
                break
            daemon = self.daemons[best.model]
            device_id = self.book.device_id(daemon)
            first = waiter.get(device_id)
            if first is not None and first.skips >= self.policy.max_skips:
                blocked.add(daemon.name)  # nothing more overtakes it on this device
                continue
            outcome = self._try_start(daemon, best, may_plan=first is None, now=now)
            if outcome == STARTED:
                if first is not None:
                    first.skips += 1
            elif outcome == WAITING_MEMORY:
                blocked.add(daemon.name)
                if first is None:
                    waiter[device_id] = best
            elif outcome == BLOCKED:
                blocked.add(daemon.name)
        self._waiting = bool(waiter)
        if self._preload_due:
            self._preload(waiter)

    def _preload(self, waiter: dict) -> None:
        """Load daemons that asked for it when they came up, if they fit as things are.

        In configuration order: room stays set aside for a daemon earlier in
        the file whose process has not registered yet, so which daemons are
        preloaded does not depend on which process starts fastest.
        """
        set_aside: dict[str, int] = {}  # device id -> footprints of earlier daemons to come
        self._preload_due = False
        for daemon in self.daemons.values():
            device = self.book.device(daemon)
            device_id = None if device is None else device.id
            if (daemon.identity is None and daemon.state == DaemonState.STARTING
                    and daemon.process.get("status") in ("pending", "starting", "running")
                    and daemon.limits.preload and not daemon.preload_tried):
                set_aside[device_id] = set_aside.get(device_id, 0) + \
                    daemon.footprint.at(Tier.RESIDENT)
                self._preload_due = True  # look again when it registers
                continue
            if (daemon.preload_tried or daemon.identity is None or daemon.target is not None
                    or daemon.tier != Tier.UNLOADED or daemon.state != DaemonState.UNLOADED):
                continue
            daemon.preload_tried = True
            if not daemon.limits.preload or daemon.queued() or daemon.unload_waiters:
                continue
            limit = self.book.limit(device_id)
            if limit is not None:
                if device_id in waiter:
                    continue  # the room is promised to a waiting request
                room = limit.budget(device.total) - self.book.committed(device) + \
                    self.book.usage(daemon) - set_aside.get(device_id, 0)
                if daemon.footprint.at(Tier.RESIDENT) > room:
                    log.info("daemon=%s not preloaded: it needs %s and %s has %s free under "
                             "its threshold; it loads when called", daemon.name,
                             format_bytes(daemon.footprint.at(Tier.RESIDENT)), device.id,
                             format_bytes(max(0, room)))
                    continue
            self._move(daemon, Tier.RESIDENT, "preload", "preload")

    def _try_start(self, daemon: Daemon, request: Request, may_plan: bool, now: float) -> str:
        if daemon.unload_waiters or daemon.target is not None:
            return BLOCKED  # its own move comes first; its room is already reserved
        if now < daemon.retry_at:
            return BLOCKED
        if daemon.tier == Tier.RESIDENT and daemon.identity is not None:
            if daemon.state != DaemonState.READY:
                return BLOCKED
            if request.action == Action.LOAD:
                self._pop(daemon, request)
                self.requests.pop(request.key, None)
                self.effects.reply_result(request, self.row(daemon.name))
                return ANSWERED
            slot = next(iter(self._free_slots(daemon)), None)
            if slot is None:
                return BLOCKED
            extra = self._needs(daemon, request)[1]
            device = self.book.device(daemon)
            limit = self.book.limit(None if device is None else device.id)
            if limit is None:
                return self._dispatch(daemon, request, slot, 0)
            deficit = self.book.committed(device) + extra - limit.budget(device.total)
            if deficit <= 0:
                return self._dispatch(daemon, request, slot, extra)
        else:
            startable = (daemon.identity is not None and daemon.state not in TRANSITIONAL) or (
                daemon.want_stopped and daemon.state == DaemonState.STOPPED)
            if not startable:
                return BLOCKED  # starting, restarting after a crash, or failed to start
            if daemon.state == DaemonState.FAILED and request.action != Action.LOAD:
                return BLOCKED
            device = self.book.device(daemon)
            limit = self.book.limit(None if device is None else device.id)
            if limit is None:
                self._move(daemon, Tier.RESIDENT, "a request is waiting", _cause(request))
                return WAITING_MEMORY
            resident, extra = self._needs(daemon, request)
            deficit = (self.book.committed(device) - self.book.usage(daemon) + resident + extra
                       - limit.budget(device.total))
            if deficit <= 0:
                self._move(daemon, Tier.RESIDENT, "{} {} is waiting".format(
                    request.priority, "call of " + request.method
                    if request.action == Action.CALL else "load"), _cause(request))
                return WAITING_MEMORY
        never = self._never_fits(daemon, request)
        if never:
            self._pop(daemon, request)
            self.requests.pop(request.key, None)
            self.effects.reply_error(request, "insufficient_memory", never)
            return ANSWERED
        if not may_plan:
            return WAITING_MEMORY
        deficit -= self.book.pending_frees(device)
        if deficit <= 0:
            return WAITING_MEMORY  # moves under way free enough: wait for them
        rank = self._effective_class(request, now)
        plan = plan_room(deficit, self._victims(device, daemon, rank, now))
        if plan:
            reason = "making room for {} ({} {})".format(daemon.name, request.priority,
                                                        request.method)
            for step in plan:
                victim = self.daemons[step.name]
                victim.evictions += 1
                self._move(victim, step.target, "{}: frees {}".format(
                    reason, format_bytes(step.frees)), "room")
        return WAITING_MEMORY

    def _dispatch(self, daemon: Daemon, request: Request, slot: int, reserved: int) -> str:
        self._pop(daemon, request)
        daemon.fresh_since = None
        request.state = RequestState.RUNNING
        request.slot = slot
        request.reserved = reserved
        measured = self.book.measured(daemon)
        request.base_usage = daemon.footprint.at(Tier.RESIDENT) if measured is None else measured
        request.base_cuda = daemon.mem.get("cuda")
        request.peak_seen = 0
        request.started_at = self.clock()
        request.sender = daemon.slots[slot]
        daemon.running[request.key] = request
        if self.effects.dispatch(daemon, request) is False:
            # The slot's socket has not connected yet (a daemon that just
            # registered, or a broker that just restarted): try shortly.
            del daemon.running[request.key]
            request.state = RequestState.QUEUED
            request.slot = None
            request.sender = None
            request.reserved = 0
            request.started_at = None
            daemon.queues[request.priority].appendleft(request)
            daemon.retry_at = self.clock() + DISPATCH_RETRY_S
            return BLOCKED
        return STARTED

    def _unload_idle(self, now: float) -> None:
        """Explicit unloads: once the daemon's calls have drained."""
        for daemon in self.daemons.values():
            if not daemon.unload_waiters or daemon.running or daemon.target is not None:
                continue
            if daemon.tier in (Tier.UNLOADED, Tier.STOPPED) or daemon.identity is None:
                self._answer_unload_waiters(daemon)
            elif daemon.state not in TRANSITIONAL:
                self._move(daemon, Tier.UNLOADED, "asked by `modelhost unload`", "unload")

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
        if isinstance(update.get("mem"), dict):
            daemon.mem = update["mem"]

    def _adopt(self, daemon: Daemon, call: dict) -> None:
        """A call still running in a daemon that registers with a restarted broker."""
        key = (call.get("client"), call.get("id"))
        if key in self.requests or key in self._abandoned or not isinstance(key[0], bytes):
            return
        slot = call.get("slot")
        # Its replies come from the slot it runs on, whatever index it is counted under.
        sender = daemon.slots[slot] if isinstance(slot, int) and 0 <= slot < len(daemon.slots) \
            else None
        free = self._free_slots(daemon)
        if slot not in free:
            # A register that does not say which slot: take the first free one
            # so the call still counts against the concurrency limit.
            slot = free[0] if free else None
        request = Request(client=key[0], id=key[1], model=daemon.name,
                          method=call.get("method") or "?", forward={}, payloads=[],
                          state=RequestState.RUNNING, enqueued_at=self.clock(),
                          started_at=self.clock(), slot=slot, sender=sender)
        request.reserved = daemon.footprint.peak(request.method)
        self.requests[key] = request
        daemon.running[key] = request

    @staticmethod
    def _free_slots(daemon: Daemon) -> list[int]:
        busy = {request.slot for request in daemon.running.values()}
        return [index for index in range(min(len(daemon.slots), daemon.limits.concurrency))
                if index not in busy]

    @staticmethod
    def _pop(daemon: Daemon, request: Request) -> None:
        queue = daemon.queues[request.priority]
        if queue and queue[0] is request:
            queue.popleft()
        else:
            queue.remove(request)

    def _unqueue(self, daemon: Daemon, request: Request) -> None:
        if request.action == Action.UNLOAD:
            daemon.unload_waiters.remove(request)
        else:
            self._pop(daemon, request)
        self.requests.pop(request.key, None)

    def _finish(self, request: Request) -> None:
        self.requests.pop(request.key, None)
        daemon = self.daemons.get(request.model)
        if daemon is not None:
            daemon.running.pop(request.key, None)

    def _expire(self, request: Request) -> None:
        daemon = self.daemons[request.model]
        message = "the {} did not finish within its timeout".format(
            "call" if request.action == Action.CALL else request.action)
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.effects.reply_error(request, "timeout", message + " (it was still queued; "
                                     "{} is {}, {} running and {} queued)".format(
                                         daemon.name, daemon.state, len(daemon.running),
                                         daemon.queued()))
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
