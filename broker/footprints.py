"""Daemon footprints: how much memory each daemon holds, declared and measured.

A daemon's footprint is what it holds on its device at each tier (resident,
offloaded, unloaded) and the extra its calls take at their peak, per method.
The configuration declares the resident and peak figures; the broker measures
all of them (after every tier change, and at the peak of every call) and
prefers what it measured. Measurements are kept in the broker's state
directory, so a restarted broker admits calls with what it learned before.

A measurement belongs to one daemon build: when the engine, its options, its
interpreter or its device change, the remembered figures are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from modelhost.protocol import Tier

log = logging.getLogger("modelhost.broker")

STATE_FILE = "memory-state.json"
STATE_VERSION = 1
# Peaks per method are the largest of the last calls: a large call raises
# the figure at once, and it comes down again once such calls stop.
PEAK_HISTORY = 16


@dataclass
class Footprint:
    declared_resident: int | None = None
    declared_peak: int | None = None
    # Measured bytes held on the device at each tier (None: not seen yet).
    measured: dict = field(default_factory=dict)  # Tier.* -> bytes
    # method -> recent peaks above the resident figure, newest last.
    peaks: dict = field(default_factory=dict)
    # Tier.* -> seconds the last move to that tier took (loads, onloads).
    took_s: dict = field(default_factory=dict)

    def at(self, tier: str) -> int:
        """Bytes the daemon holds at `tier`, measured in preference to declared."""
        if tier == Tier.STOPPED:
            return 0
        measured = self.measured.get(tier)
        if measured is not None:
            return measured
        if tier == Tier.RESIDENT:
            return self.declared_resident or 0
        # Not seen yet: assume the tier frees what it promises. The probe
        # checks after the move, and a tier that frees nothing is remembered.
        return 0

    def peak(self, method: str) -> int:
        """Extra bytes a call of `method` takes at its peak."""
        history = self.peaks.get(method)
        if history:
            return max(history)
        if self.declared_peak is not None:
            return self.declared_peak
        # A method never measured: its siblings are the best guess there is.
        return max((max(h) for h in self.peaks.values() if h), default=0)

    def measured_peak(self) -> int | None:
        values = [max(h) for h in self.peaks.values() if h]
        return max(values) if values else None

    def record_peak(self, method: str, extra: int) -> None:
        self.peaks.setdefault(method, deque(maxlen=PEAK_HISTORY)).append(max(0, int(extra)))

    def describe(self) -> dict:
        return {"declared": {"resident": self.declared_resident, "peak": self.declared_peak},
                "measured": {"resident": self.measured.get(Tier.RESIDENT),
                             "peak": self.measured_peak(),
                             "offloaded": self.measured.get(Tier.OFFLOADED),
                             "unloaded": self.measured.get(Tier.UNLOADED)},
                "took_s": dict(self.took_s)}


def fingerprint(*parts) -> str:
    """A short hash naming one build of a daemon."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FootprintStore:
    """Footprints and pins of every daemon, saved as JSON in the state directory."""

    def __init__(self, path: Path | None, fingerprints: dict[str, str]):
        self.path = path
        self.fingerprints = fingerprints
        self.footprints = {name: Footprint() for name in fingerprints}
        self.pins: dict[str, bool] = {}  # set at run time with `modelhost pin/unpin`
        self._dirty = False
        self._load()

    def mark_dirty(self) -> None:
        self._dirty = True

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != STATE_VERSION:
                raise ValueError("version {!r}".format(data.get("version")))
            entries = data["daemons"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Measurements are an optimisation: start from the declared
            # figures rather than refuse to start.
            log.warning("ignoring remembered footprints in %s: %s", self.path, exc)
            return
        for name, entry in entries.items():
            if name not in self.footprints or not isinstance(entry, dict):
                continue
            if entry.get("fingerprint") != self.fingerprints[name]:
                log.info("daemon=%s changed since its footprint was measured; measuring again",
                         name)
                continue
            footprint = self.footprints[name]
            footprint.measured = {tier: int(value) for tier, value in
                                  (entry.get("measured") or {}).items()
                                  if tier in Tier.ALL and isinstance(value, int)}
            for method, value in (entry.get("peaks") or {}).items():
                if isinstance(value, int):
                    footprint.record_peak(method, value)
            footprint.took_s = {tier: float(value) for tier, value in
                                (entry.get("took_s") or {}).items()
                                if isinstance(value, (int, float))}
            if isinstance(entry.get("pinned"), bool):
                self.pins[name] = entry["pinned"]

    def save(self) -> None:
        """Write the file if anything changed since the last save (atomically)."""
        if not self._dirty or self.path is None:
            return
        self._dirty = False
        data = {"version": STATE_VERSION, "saved_at": time.time(), "daemons": {
            name: {"fingerprint": self.fingerprints[name],
                   "measured": footprint.measured,
                   "peaks": {method: max(history) for method, history in footprint.peaks.items()
                             if history},
                   "took_s": footprint.took_s,
                   "pinned": self.pins.get(name)}
            for name, footprint in self.footprints.items()}}
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("cannot save footprints to %s: %s", self.path, exc)
