"""Admission and victim ranking: whether a daemon takes a request at all, what the
request needs of its device and whether it could ever fit, how urgent a waiting
request and a daemon's work are, and which idle daemons may be moved down for
it. placement.py then picks the moves.

Pure functions over the scheduler's daemons and the memory book: they decide
nothing and log nothing; the scheduler acts on what they return.
"""

from __future__ import annotations

from modelhost.errors import (
    BadArguments, DaemonUnavailable, InsufficientMemory, ModelhostError, OverCapacity,
    PayloadTooLarge, UnknownMethod,
)
from modelhost.protocol import DaemonState, Priority, Tier

from .accounting import MemoryBook
from .config import MemoryConfig
from .memory import DeviceMemory, format_bytes
from .placement import DEPTH, Candidate
from .scheduler_types import Action, Daemon, Request
from .transitions import TRANSITIONAL

PRIORITY_INDEX = {priority: index for index, priority in enumerate(Priority.ALL)}
LOWEST_RANK = len(Priority.ALL) - 1
INTERACTIVE = PRIORITY_INDEX[Priority.INTERACTIVE]
# A daemon made resident for waiting work is evicted only by interactive work
# until that work has started, or this long has passed.
FRESH_S = 5.0


def refusal_of(book: MemoryBook, daemon: Daemon, request: Request) -> ModelhostError | None:
    """Why the daemon does not take the request (into its queue), or None."""
    is_call = request.action == Action.CALL
    # A failed daemon still takes a load (it retries); a stopped one that
    # the memory manager did not stop has nobody to start it.
    unavailable = (DaemonState.FAILED, DaemonState.STOPPED) if is_call else \
        (DaemonState.STOPPED,) if request.action == Action.LOAD else ()
    if daemon.identity is None and daemon.process.get("final"):
        unavailable = (DaemonState.FAILED,) + unavailable  # no process will ever come
    if daemon.state in unavailable and not daemon.want_stopped:
        return DaemonUnavailable("daemon {} is {}: {}".format(
            daemon.name, daemon.state, daemon.error or "see `modelhost ps`"))
    if is_call and daemon.methods is not None and request.method not in daemon.methods:
        return UnknownMethod("{} has no method {!r}; it offers: {}".format(
            daemon.name, request.method, ", ".join(daemon.methods)))
    if request.payload_bytes > daemon.max_payload_bytes:
        return PayloadTooLarge(
            "the request carries {} bytes of payload; {} accepts at most {} (max_payload "
            "in its config)".format(request.payload_bytes, daemon.name,
                                    daemon.max_payload_bytes))
    queued = daemon.queued()
    if queued >= daemon.config.max_queue:
        return OverCapacity(
            "{} already has {} calls queued (max_queue); retry later or raise max_queue"
            .format(daemon.name, queued))
    if request.action == Action.UNLOAD and daemon.pinned:
        return BadArguments(
            "{} is pinned, so it stays loaded; unpin it first (modelhost unpin {})".format(
                daemon.name, daemon.name))
    # A call that can start right away fits; one that will wait learns
    # now, not at the head of the queue, that it never could.
    starts_now = (daemon.serving and daemon.target is None and not queued
                  and len(daemon.running) < daemon.config.concurrency)
    if request.action != Action.UNLOAD and not starts_now:
        return never_fits(book, daemon, request)
    return None


def needs(daemon: Daemon, request: Request) -> tuple[int, int]:
    """(resident bytes, peak bytes) the request needs of its daemon's device."""
    peak = daemon.footprint.peak(request.method) if request.action == Action.CALL else 0
    return daemon.footprint.at(Tier.RESIDENT), peak


def never_fits(book: MemoryBook, daemon: Daemon, request: Request) -> InsufficientMemory | None:
    """Why the request could not run even with every other daemon evicted, or None."""
    device = book.device(daemon)
    limit = book.limit(None if device is None else device.id)
    if limit is None:
        return None
    resident, peak = needs(daemon, request)
    budget = limit.budget(device.total)
    external = book.external(device)
    pinned = [d for d in book.on_device(device) if d is not daemon and d.pinned]
    held_by_pinned = sum(book.usage(d) for d in pinned)
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
    return InsufficientMemory(", ".join(parts) + ": it can never fit. Raise "
                              "memory.threshold, unpin a daemon, or lower the daemon's "
                              "footprint.")


def rank(daemon: Daemon, now: float, memory: MemoryConfig) -> int:
    """The most urgent priority class the daemon serves lately (0 = interactive)."""
    ranks = [PRIORITY_INDEX[p] for p, queue in daemon.queues.items() if queue]
    if daemon.config.priority is not None:
        ranks.append(PRIORITY_INDEX[daemon.config.priority])
    ranks += [PRIORITY_INDEX[p] for p, when in daemon.served.items()
              if now - when <= memory.priority_window_s]
    return min(ranks, default=LOWEST_RANK)


def effective_class(request: Request, now: float, memory: MemoryConfig) -> int:
    """The request's priority class, raised one class per aging_s it has waited."""
    aged = int((now - request.enqueued_at) / memory.aging_s) if memory.aging_s > 0 else 0
    return max(0, PRIORITY_INDEX[request.priority] - aged)


def victims(book: MemoryBook, memory: MemoryConfig, device: DeviceMemory, needer: Daemon,
            rank_at_least: int, now: float, can_stop: bool) -> list[Candidate]:
    """Idle daemons that a request of class `rank_at_least` may move down.

    `can_stop`: whether a process may be stopped (someone would start it again).
    """
    candidates = []
    for daemon in book.on_device(device):
        if (daemon is needer or daemon.pinned or daemon.running or daemon.identity is None
                or daemon.target is not None or daemon.tier == Tier.STOPPED
                or daemon.state in TRANSITIONAL or daemon.unload_waiters):
            continue
        its_rank = rank(daemon, now, memory)
        if its_rank == INTERACTIVE < rank_at_least:
            continue  # it serves the interactive loop; only interactive work evicts it
        if daemon.fresh_since is not None and rank_at_least != INTERACTIVE \
                and now - daemon.fresh_since < FRESH_S:
            continue  # loaded for work that has not started yet
        usage = book.usage(daemon)
        holds = {daemon.tier: usage}
        for tier in Tier.ALL[DEPTH[daemon.tier] + 1:]:
            if tier == Tier.OFFLOADED and Tier.OFFLOADED not in daemon.tiers:
                continue
            if tier == Tier.STOPPED and not can_stop:
                continue
            holds[tier] = min(usage, daemon.footprint.at(tier))
        candidates.append(Candidate(daemon.name, daemon.tier, holds, its_rank,
                                    daemon.last_used, daemon.queued() > 0))
    return candidates
