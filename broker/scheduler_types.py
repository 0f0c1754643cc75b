"""The scheduler's types: requests, daemons as the scheduler sees them, the
`Effects` interface through which it acts, and what it tells the broker.

The scheduler (scheduler.py) changes these objects; the broker reads the ones
an effect hands it (a Request to reply to, a Daemon to send to), and what the
scheduler returns (`Ended`, `Routing`, `Registered`); it never reaches into the
scheduler's dictionaries.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

from modelhost import protocol
from modelhost.errors import ModelhostError
from modelhost.protocol import DaemonState, Priority, Tier

from .config import DaemonConfig
from .footprints import Footprint
from .transitions import Cause, check, transition

RequestKey = tuple[bytes, Any]  # (client identity, request id)


class RequestState(enum.Enum):
    QUEUED = "queued"  # waiting in its daemon's queue
    RUNNING = "running"  # handed to the daemon
    ANSWERED = "answered"  # client has its terminal reply; the daemon has not finished yet


class Action(enum.Enum):
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
    action: Action = Action.CALL
    seq: int = 0  # arrival order, for first-come first-served among equals
    # Times a later call started while this one waited for memory.
    skips: int = 0
    # Memory while running: bytes reserved for its peak, what its daemon held
    # when it started, and the most the probe saw the daemon hold during it.
    reserved: int = 0
    base_usage: int = 0
    base_cuda: int | None = None
    peak_seen: int = 0
    # Set by the scheduler as the request gets its terminal reply. (It names no
    # request: a cycle would keep every request alive until the garbage collector ran.)
    ended: Ended | None = None

    @property
    def key(self) -> RequestKey:
        return (self.client, self.id)


class Ended(NamedTuple):
    """How a request that got its terminal reply ended, as its `request` event reports it."""

    daemon: str | None  # the daemon it was for; None: no daemon of that name here
    # Its method where that is a method of its daemon's (or load, unload); None
    # for anything else, which gets no label of its own.
    method: str | None
    queue_s: float  # from its arrival to its start, or to its end if it never started
    run_s: float | None  # from its start to its end; None if it never started


def ended(request: Request, daemon: Daemon | None, now: float) -> Ended:
    started = request.started_at
    method = request.method
    if daemon is None or (daemon.methods is not None and method not in daemon.methods
                          and method not in (protocol.LOAD, protocol.UNLOAD)):
        method = None
    return Ended(None if daemon is None else daemon.name, method,
                 (now if started is None else started) - request.enqueued_at,
                 None if started is None else now - started)


class Route(enum.Enum):
    """Where a daemon's reply goes."""

    FORWARD = "forward"  # to the client of the call it answers
    # A call this broker does not know (it restarted): held until the client's
    # next ping says whether it still waits for it.
    UNCLAIMED = "unclaimed"
    DROP = "drop"  # refused (not from the call's slot), or its caller is answered already


class Routing(NamedTuple):
    route: Route
    # A forwarded terminal reply: its request, whose `ended` is set.
    request: Request | None = None


class Registered(NamedTuple):
    """What the broker needs of a daemon that registered."""

    pid: int | None
    slots: tuple  # routing ids of its call slots: its sockets besides the control socket
    interpreter: str | None
    state: str


@dataclass(eq=False)
class Daemon:
    name: str
    config: DaemonConfig  # as the configuration file says (concurrency, device, pin, ...)
    # Its config's max_payload, else the broker's.
    max_payload_bytes: int
    state: str = DaemonState.STARTING  # changed only by transitions.transition
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
        return sum(map(len, self.queues.values()))

    def free_slots(self) -> list[int]:
        """Indexes of its slots that run no call, up to its concurrency."""
        busy = {request.slot for request in self.running.values()}
        return [index for index in range(min(len(self.slots), self.config.concurrency))
                if index not in busy]

    def pop(self, request: Request) -> None:
        """Take a queued request out of its queue (most often the first)."""
        queue = self.queues[request.priority]
        if queue and queue[0] is request:
            queue.popleft()
        else:
            queue.remove(request)

    @property
    def serving(self) -> bool:
        return self.identity is not None and self.state == DaemonState.READY

    def take_registration(self, identity: bytes, info: dict, now: float) -> None:
        """What its register message says: its process, sockets, methods, tier and state.

        The state is checked first (transitions.check), so a refused one takes
        nothing of the message.
        """
        if info.get("state"):
            check(self, info["state"], Cause.REPORT)
        self.identity = identity
        self.last_seen = now
        self.pid = info.get("pid")
        self.interpreter = info.get("interpreter")
        self.python = info.get("python")
        self.engine = info.get("engine")
        self.methods = list(info.get("methods") or [])
        self.slots = list(info.get("slots") or [identity] * self.config.concurrency)
        self.retry_at = 0.0
        self.started_at = now - float(info.get("uptime_s") or 0.0)
        self.want_stopped = False
        self.tiers = tuple(info.get("tiers") or (Tier.RESIDENT, Tier.UNLOADED))
        if not self.last_used:
            self.last_used = now
        tier = info.get("tier")
        if tier not in Tier.ALL:
            # A runtime that does not speak of tiers is loaded when ready.
            tier = Tier.RESIDENT if info.get("state") in (DaemonState.READY,
                                                         DaemonState.BUSY) else Tier.UNLOADED
        self.tier = tier
        self.target = None
        self.take_report(info)

    def take_report(self, update: dict) -> None:
        """What a register or state message says of its engine."""
        if update.get("state"):
            transition(self, update["state"], Cause.REPORT)
        if "error" in update:
            self.error = update.get("error")
        if update.get("facts") is not None:
            self.facts = update["facts"]
        if update.get("loads") is not None:
            self.loads = update["loads"]
        if isinstance(update.get("mem"), dict):
            self.mem = update["mem"]

    def adopt(self, call: dict, now: float) -> Request:
        """The request of a call it is running, as its register lists it."""
        slot = call.get("slot")
        # Its replies come from the slot it runs on, whatever index it is counted under.
        sender = self.slots[slot] if isinstance(slot, int) and 0 <= slot < len(self.slots) \
            else None
        free = self.free_slots()
        if slot not in free:
            # A register that does not say which slot: take the first free one
            # so the call still counts against the concurrency limit.
            slot = free[0] if free else None
        request = Request(client=call["client"], id=call.get("id"), model=self.name,
                          method=call.get("method") or "?", forward={}, payloads=[],
                          state=RequestState.RUNNING, enqueued_at=now, started_at=now,
                          slot=slot, sender=sender)
        request.reserved = self.footprint.peak(request.method)
        return request


class Effects(Protocol):
    # To `request.sender`, the slot chosen for it. False when that socket is
    # not connected (yet): the request is queued again.
    def dispatch(self, daemon: Daemon, request: Request) -> bool | None: ...
    def cancel_remote(self, daemon: Daemon, request: Request) -> None: ...
    # A request's terminal reply; `request.ended` is set (see Replies). The
    # broker puts the error's code and message on the wire.
    def reply_error(self, request: Request, error: ModelhostError) -> None: ...
    def reply_cancelled(self, request: Request, message: str) -> None: ...
    def reply_result(self, request: Request, value: Any) -> None: ...
    # Memory tiers: a command to the daemon, or (stopped) to its supervisor.
    def set_tier(self, daemon: Daemon, tier: str) -> None: ...
    def set_process(self, daemon: Daemon, running: bool) -> None: ...
    # Something people watch for happened (broker/events.py lists the kinds).
    def event(self, kind: str, daemon: str | None, **fields: Any) -> None: ...


class Replies:
    """The scheduler's terminal replies: the one way it answers a request, each with
    the request's `ended` filled in first."""

    def __init__(self, effects: Effects, daemons: dict[str, Daemon], clock: Callable[[], float]):
        self.effects = effects
        self.daemons = daemons
        self.clock = clock

    def end(self, request: Request) -> Ended:
        request.ended = ended(request, self.daemons.get(request.model), self.clock())
        return request.ended

    def error(self, request: Request, error: ModelhostError) -> None:
        self.end(request)
        self.effects.reply_error(request, error)

    def result(self, request: Request, value: Any) -> None:
        self.end(request)
        self.effects.reply_result(request, value)

    def cancelled(self, request: Request, message: str) -> None:
        self.end(request)
        self.effects.reply_cancelled(request, message)


class Deadlines:
    """The requests that have a deadline, soonest first.

    Each entry holds the request itself, so a deadline can never hit a later
    request that reuses a finished one's id; `live(request)` says whether a
    request's deadline still counts (it is still known and not answered).
    """

    def __init__(self, live: Callable[[Request], bool]):
        self._heap: list[tuple[float, int, Request]] = []  # (deadline, tie-breaker, request)
        self._added = 0
        self._live = live

    def add(self, request: Request) -> None:
        self._added += 1
        heapq.heappush(self._heap, (request.deadline, self._added, request))

    def next(self) -> float | None:
        """The soonest deadline that still counts."""
        while self._heap and not self._live(self._heap[0][2]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[Request]:
        """The requests whose deadline has come, each taken off as it is yielded."""
        while self._heap and self._heap[0][0] <= now:
            request = heapq.heappop(self._heap)[2]
            if self._live(request):
                yield request
