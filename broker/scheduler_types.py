"""The scheduler's types: requests, daemons as the scheduler sees them, and the
`Effects` interface through which it acts.

The scheduler (scheduler.py) changes these objects; the broker reads the ones
an effect hands it (a Request to reply to, a Daemon to send to).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelhost.errors import ModelhostError
from modelhost.protocol import DaemonState, Priority, Tier

from .config import DaemonConfig
from .footprints import Footprint

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

    @property
    def key(self) -> RequestKey:
        return (self.client, self.id)


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
        return sum(len(q) for q in self.queues.values())

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


class Effects(Protocol):
    # False when the request's slot is not connected (yet): it is queued again.
    def dispatch(self, daemon: Daemon, request: Request) -> bool | None: ...
    def cancel_remote(self, daemon: Daemon, request: Request) -> None: ...
    # The broker puts the error's code and message on the wire.
    def reply_error(self, request: Request, error: ModelhostError) -> None: ...
    def reply_cancelled(self, request: Request, message: str) -> None: ...
    def reply_result(self, request: Request, value: Any) -> None: ...
    # Memory tiers: a command to the daemon, or (stopped) to its supervisor.
    def set_tier(self, daemon: Daemon, tier: str) -> None: ...
    def set_process(self, daemon: Daemon, running: bool) -> None: ...
    # Something people watch for happened (broker/events.py lists the kinds).
    def event(self, kind: str, daemon: str | None, **fields: Any) -> None: ...
