"""The pump: which queued request starts next, most urgent first, and what to do
for one that cannot start yet (load its daemon, or make room for it).

One global order over every daemon's queues: priority class raised one step
per `aging_s` waited, then arrival. A request that cannot start for memory
becomes its device's *waiter*: only it plans evictions (admission.py chooses
the victims, placement.py the moves). Requests behind it that fit without
evicting anything may overtake it `max_skips` times; then everything behind
it on that device waits.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

from modelhost.protocol import DaemonState, Tier

from .accounting import MemoryBook
from .admission import effective_class, needs, never_fits, victims
from .config import MemoryConfig
from .memory import format_bytes
from .placement import plan_room
from .scheduler_types import (
    Action, Daemon, Effects, Replies, Request, RequestKey, RequestState,
)
from .tier_moves import TierMoves, load_cause
from .transitions import TRANSITIONAL

log = logging.getLogger("modelhost.broker")

# After a dispatch to a slot that is not connected yet, the next try.
DISPATCH_RETRY_S = 0.05


class Outcome(enum.Enum):
    """What came of trying to start the first queued request of a daemon."""

    STARTED = "started"  # dispatched to a free slot
    BLOCKED = "blocked"  # not now (no free slot, a move under way): the next daemon's turn
    WAITING_MEMORY = "waiting"  # its daemon is being loaded, or room is being made
    ANSWERED = "answered"  # it got its terminal reply (a load that is done, or never fits)


class Pump:
    """Starts queued requests, loads daemons for them and makes room; run after each event."""

    def __init__(self, daemons: dict[str, Daemon], requests: dict[RequestKey, Request],
                 book: MemoryBook, memory: MemoryConfig, effects: Effects, replies: Replies,
                 moves: TierMoves, clock: Callable[[], float], row: Callable[[str], dict]):
        # The scheduler's own dictionaries: the pump takes requests out of them.
        self.daemons = daemons
        self.requests = requests
        self.book = book
        self.memory = memory
        self.effects = effects
        self.replies = replies
        self.moves = moves
        self.clock = clock
        self.row = row  # a daemon's `ps` row, the value of load and unload replies
        self.waiting = False  # some request waits for memory: look again soon
        self.preload_due = False  # a daemon registered: see whether it preloads

    def run(self) -> None:
        """Start what can start, most urgent first, and make room for what cannot."""
        now = self.clock()
        self.unload_idle(now)
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
                        key = (effective_class(request, now, self.memory), request.seq)
                        if best_key is None or key < best_key:
                            best, best_key = request, key
            if best is None:
                break
            daemon = self.daemons[best.model]
            device_id = self.book.device_id(daemon)
            first = waiter.get(device_id)
            if first is not None and first.skips >= self.memory.max_skips:
                blocked.add(daemon.name)  # nothing more overtakes it on this device
                continue
            outcome = self.try_start(daemon, best, may_plan=first is None, now=now)
            if outcome is Outcome.STARTED:
                if first is not None:
                    first.skips += 1
            elif outcome is Outcome.WAITING_MEMORY:
                blocked.add(daemon.name)
                if first is None:
                    waiter[device_id] = best
            elif outcome is Outcome.BLOCKED:
                blocked.add(daemon.name)
        self.waiting = bool(waiter)
        if self.preload_due:
            self.preload(waiter)

    def preload(self, waiter: dict) -> None:
        """Load daemons that asked for it when they came up, if they fit as things are.

        In configuration order: room stays set aside for a daemon earlier in
        the file whose process has not registered yet, so which daemons are
        preloaded does not depend on which process starts fastest.
        """
        set_aside: dict[str, int] = {}  # device id -> footprints of earlier daemons to come
        self.preload_due = False
        for daemon in self.daemons.values():
            device = self.book.device(daemon)
            device_id = None if device is None else device.id
            if (daemon.identity is None and daemon.state == DaemonState.STARTING
                    and daemon.process.get("status") in ("pending", "starting", "running")
                    and daemon.config.preload and not daemon.preload_tried):
                set_aside[device_id] = set_aside.get(device_id, 0) + \
                    daemon.footprint.at(Tier.RESIDENT)
                self.preload_due = True  # look again when it registers
                continue
            if (daemon.preload_tried or daemon.identity is None or daemon.target is not None
                    or daemon.tier != Tier.UNLOADED or daemon.state != DaemonState.UNLOADED):
                continue
            daemon.preload_tried = True
            if not daemon.config.preload or daemon.queued() or daemon.unload_waiters:
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
            self.moves.move(daemon, Tier.RESIDENT, "preload", "preload")

    def try_start(self, daemon: Daemon, request: Request, may_plan: bool,
                  now: float) -> Outcome:
        if daemon.unload_waiters or daemon.target is not None:
            return Outcome.BLOCKED  # its own move comes first; its room is already reserved
        if now < daemon.retry_at:
            return Outcome.BLOCKED
        if daemon.tier == Tier.RESIDENT and daemon.identity is not None:
            if daemon.state != DaemonState.READY:
                return Outcome.BLOCKED
            if request.action == Action.LOAD:
                daemon.pop(request)
                self.requests.pop(request.key, None)
                self.replies.result(request, self.row(daemon.name))
                return Outcome.ANSWERED
            slot = next(iter(daemon.free_slots()), None)
            if slot is None:
                return Outcome.BLOCKED
            extra = needs(daemon, request)[1]
            device = self.book.device(daemon)
            limit = self.book.limit(None if device is None else device.id)
            if limit is None:
                return self.dispatch(daemon, request, slot, 0)
            deficit = self.book.committed(device) + extra - limit.budget(device.total)
            if deficit <= 0:
                return self.dispatch(daemon, request, slot, extra)
        else:
            startable = (daemon.identity is not None and daemon.state not in TRANSITIONAL) or (
                daemon.want_stopped and daemon.state == DaemonState.STOPPED)
            if not startable:
                return Outcome.BLOCKED  # starting, restarting after a crash, or failed to start
            if daemon.state == DaemonState.FAILED and request.action != Action.LOAD:
                return Outcome.BLOCKED
            device = self.book.device(daemon)
            limit = self.book.limit(None if device is None else device.id)
            if limit is None:
                self.moves.move(daemon, Tier.RESIDENT, "a request is waiting", load_cause(request))
                return Outcome.WAITING_MEMORY
            resident, extra = needs(daemon, request)
            deficit = (self.book.committed(device) - self.book.usage(daemon) + resident + extra
                       - limit.budget(device.total))
            if deficit <= 0:
                self.moves.move(daemon, Tier.RESIDENT, "{} {} is waiting".format(
                    request.priority, "call of " + request.method
                    if request.action == Action.CALL else "load"), load_cause(request))
                return Outcome.WAITING_MEMORY
        never = never_fits(self.book, daemon, request)
        if never is not None:
            daemon.pop(request)
            self.requests.pop(request.key, None)
            self.replies.error(request, never)
            return Outcome.ANSWERED
        if not may_plan:
            return Outcome.WAITING_MEMORY
        deficit -= self.book.pending_frees(device)
        if deficit <= 0:
            return Outcome.WAITING_MEMORY  # moves under way free enough: wait for them
        rank = effective_class(request, now, self.memory)
        plan = plan_room(deficit, victims(self.book, self.memory, device, daemon, rank, now,
                                         self.moves.can_stop(now)))
        if plan:
            reason = "making room for {} ({} {})".format(daemon.name, request.priority,
                                                        request.method)
            for step in plan:
                victim = self.daemons[step.name]
                victim.evictions += 1
                self.moves.move(victim, step.target, "{}: frees {}".format(
                    reason, format_bytes(step.frees)), "room")
        return Outcome.WAITING_MEMORY

    def dispatch(self, daemon: Daemon, request: Request, slot: int, reserved: int) -> Outcome:
        daemon.pop(request)
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
            return Outcome.BLOCKED
        return Outcome.STARTED

    def unload_idle(self, now: float) -> None:
        """Explicit unloads: once the daemon's calls have drained."""
        for daemon in self.daemons.values():
            if not daemon.unload_waiters or daemon.running or daemon.target is not None:
                continue
            if daemon.tier in (Tier.UNLOADED, Tier.STOPPED) or daemon.identity is None:
                self.answer_unload_waiters(daemon)
            elif daemon.state not in TRANSITIONAL:
                self.moves.move(daemon, Tier.UNLOADED, "asked by `modelhost unload`", "unload")

    def answer_unload_waiters(self, daemon: Daemon) -> None:
        """`modelhost unload` is done: the daemon is unloaded (or has no process)."""
        waiters, daemon.unload_waiters = daemon.unload_waiters, []
        for request in waiters:
            self.requests.pop(request.key, None)
            self.replies.result(request, self.row(daemon.name))
