"""What `modelhost ps`, the dashboard and the supervisor see of each daemon: its row."""

from __future__ import annotations

from modelhost.protocol import DaemonState

from .accounting import MemoryBook
from .scheduler_types import Daemon
from .tier_moves import ttl_expiry
from .transitions import MOVING_STATE, TRANSITIONAL


def shown_state(daemon: Daemon) -> str:
    """Its state as `ps` shows it: busy while calls run, a move once it is ordered."""
    state = daemon.state
    if state == DaemonState.READY and daemon.running:
        state = DaemonState.BUSY
    if daemon.target is not None and daemon.identity is not None \
            and state not in TRANSITIONAL:
        # Ordered, not yet begun: say so, or a load looks like idleness.
        state = MOVING_STATE.get((daemon.tier, daemon.target), state)
    return state


def daemon_row(daemon: Daemon, book: MemoryBook, now: float) -> dict:
    expiry = ttl_expiry(daemon)
    return {
        "name": daemon.name,
        "state": shown_state(daemon),
        "pid": daemon.pid if daemon.identity is not None else daemon.process.get("pid"),
        "interpreter": daemon.interpreter,
        "python": daemon.python,
        "engine": daemon.engine,
        "methods": daemon.methods,
        "uptime_s": None if daemon.started_at is None else now - daemon.started_at,
        "queued": daemon.queued(),
        "running": len(daemon.running),
        "concurrency": daemon.config.concurrency,
        "max_queue": daemon.config.max_queue,
        "loads": daemon.loads,
        "restarts": daemon.process.get("restarts", 0),
        "last_error": daemon.error,
        "facts": daemon.facts,
        "tier": daemon.tier,
        "target": daemon.target,
        "tiers": list(daemon.tiers),
        "device": book.device_id(daemon),
        "pinned": daemon.pinned,
        "memory_bytes": book.measured(daemon),
        "footprint": daemon.footprint.describe(),
        "idle_ttl_s": daemon.config.idle_ttl_s,
        "ttl_s": None if expiry is None else max(0.0, expiry - now),
        "evictions": daemon.evictions,
        "moves": dict(daemon.moves),
        "ready_pids": list(daemon.ready_pids),
    }
