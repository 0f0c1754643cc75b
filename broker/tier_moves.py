"""Tier moves: ordering a daemon up or down the memory tiers, and learning from each
move and each call what the daemon really holds (its measured footprint).
"""

from __future__ import annotations

import logging
from typing import Callable

from modelhost.protocol import DaemonState, Tier

from .accounting import MemoryBook
from .memory import format_bytes
from .placement import DEPTH
from .scheduler_types import Action, Daemon, Effects, Request
from .transitions import TRANSITIONAL, Cause, transition

log = logging.getLogger("modelhost.broker")

# A move down that frees less than this share of what it should is reported.
SHORTFALL_SHARE = 0.5
# What the supervisor must have said lately for the broker to stop processes.
SUPERVISOR_FRESH_S = 3.0


def load_cause(request: Request) -> str:
    """Why a daemon is loaded for this request, as a metrics label."""
    return "load" if request.action == Action.LOAD else "request"


def ttl_expiry(daemon: Daemon) -> float | None:
    """When the idle daemon is unloaded (idle_ttl_s), or None while that cannot happen."""
    ttl = daemon.config.idle_ttl_s
    if (ttl is None or daemon.pinned or daemon.identity is None or daemon.running
            or daemon.queued() or daemon.target is not None
            or daemon.tier not in (Tier.RESIDENT, Tier.OFFLOADED)
            or daemon.state in TRANSITIONAL):
        return None
    return daemon.last_used + ttl


class TierMoves:
    """Orders tier moves, and learns from each (and from each call) what a daemon holds."""

    def __init__(self, book: MemoryBook, effects: Effects, clock: Callable[[], float],
                 daemon_expiry_s: float):
        self.book = book
        self.effects = effects
        self.clock = clock
        self.daemon_expiry_s = daemon_expiry_s
        # When the supervisor (or systemd) last reported: processes are only
        # stopped while one does, since nobody else would start them again.
        self.supervisor_seen = float("-inf")
        self.dirty = False  # a footprint changed: the broker saves them

    def can_stop(self, now: float) -> bool:
        # Reports come every heartbeat (the supervisor's, or systemctl show's).
        return now - self.supervisor_seen <= max(SUPERVISOR_FRESH_S, self.daemon_expiry_s)

    def move(self, daemon: Daemon, target: str, reason: str, cause: str) -> None:
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
            transition(daemon, DaemonState.STARTING, Cause.START)
            self.effects.set_process(daemon, True)  # it loads once it registers
        else:
            self.effects.set_tier(daemon, target)

    def arrived(self, daemon: Daemon, target: str, update: dict) -> None:
        """A move ended (or failed): learn what the tier really holds."""
        daemon.target = None
        now = self.clock()
        measured = self.book.measured(daemon)
        took = update.get("took_s")
        if daemon.tier == target and isinstance(took, (int, float)):
            daemon.footprint.took_s[target] = float(took)
            self.dirty = True
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
                self.remember(daemon, Tier.RESIDENT, measured)
        elif DEPTH[target] > DEPTH[Tier.RESIDENT] and measured is not None:
            # Remember what the tier really holds: a tier that frees nothing
            # is skipped next time, and the planner goes on to a stop.
            expected = daemon.footprint.at(target)
            self.remember(daemon, target, measured)
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

    def remember(self, daemon: Daemon, tier: str, measured: int) -> None:
        old = daemon.footprint.measured.get(tier)
        if old is None or abs(measured - old) > max(2**20, old // 50):
            daemon.footprint.measured[tier] = measured
            self.dirty = True

    def call_ended(self, daemon: Daemon, request: Request, mem: dict | None) -> None:
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
            self.dirty = True
