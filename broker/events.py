"""What happened in the broker, for people and programs watching: numbered events.

Kinds (each event also has seq, time, kind, level and daemon):
- `state`: a daemon's state changed (state, previous, tier, error)
- `move`: a tier move was ordered (from, to, reason, cause, eviction)
- `moved`: a tier move ended (tier, took_s, failed, memory_bytes)
- `request`: a request got its terminal reply (method, rid, priority, outcome,
  queue_s, run_s)
- `error`: something failed (rid, code, message): a request answered with an
  error, a daemon that crashed, failed to load or failed to start

Every event goes to the sinks (the PUB socket, the metrics) as it happens, and
the last `keep` are kept for the dashboard's "recent events".
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

from modelhost.protocol import EVENT_KINDS as KINDS

log = logging.getLogger("modelhost.broker")
LEVELS = ("info", "warning", "error")
# The `outcome` of a `request` event answered with a result; an error's outcome is
# its code, a cancelled request's the code of modelhost.errors.Cancelled.
OK = "ok"
# Codes of `error` events about a daemon rather than a request; the others are the
# wire codes of modelhost.errors.
LOAD_FAILED = "load_failed"
START_FAILED = "start_failed"


class EventLog:
    def __init__(self, *, keep: int = 500, clock: Callable[[], float] = time.time,
                 sinks: list[Callable[[dict], None]] | None = None):
        self.clock = clock  # wall time: events are read by people and other hosts
        self.sinks = list(sinks or [])
        self.recent: deque[dict] = deque(maxlen=keep)
        self.seq = 0

    def emit(self, kind: str, daemon: str | None = None, *, level: str = "info",
             **fields: Any) -> dict:
        if kind not in KINDS or level not in LEVELS:
            raise ValueError("unknown event kind {!r} or level {!r}".format(kind, level))
        self.seq += 1
        event = dict(fields, seq=self.seq, time=self.clock(), kind=kind, level=level,
                     daemon=daemon)
        self.recent.append(event)
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:
                # Emitted from inside the scheduler's decisions: a sink that
                # fails must not leave one half made.
                log.exception("an event sink failed on %s event %d", kind, self.seq)
        return event
