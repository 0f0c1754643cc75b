"""Memory bookkeeping: what each daemon holds on its device, and what each device has taken.

The scheduler decides; this module only counts, from two sources:
- the footprints (declared, else measured) at each daemon's tier, plus the
  peaks reserved by its running calls: what the broker has committed;
- the last probe reading: what each daemon's process really holds, and what
  other processes hold on the device.

A daemon counts as the larger of the two, so neither an optimistic
footprint nor a late probe sample lets the device go over its threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .memory import DeviceMemory, MemoryReading
from .placement import DEPTH

if TYPE_CHECKING:
    from .config import DeviceLimit
    from .scheduler_types import Daemon


class MemoryBook:
    def __init__(self, daemons: dict[str, Daemon], limit_for: Callable[[str], DeviceLimit]):
        self.daemons = daemons
        # device id -> its limit (budget(total), describe(total), external).
        self.limit_for = limit_for
        self.reading = MemoryReading([])
        # Looked up on every dispatch: by id, not by a scan of the reading.
        self._devices: dict[str, DeviceMemory] = {}
        self._first_device: str | None = None
        # device id -> the daemons on it, worked out once per reading (their
        # devices are configured, or the reading's first).
        self._on_device: dict[str, list[Daemon]] = {}

    def update(self, reading: MemoryReading) -> None:
        self.reading = reading
        self._devices = {device.id: device for device in reading.devices}
        self._first_device = reading.devices[0].id if reading.devices else None
        self._on_device = {}

    def limit(self, device_id: str | None) -> DeviceLimit | None:
        if device_id is None:
            return None  # its device is not in the probe's reading (yet)
        return self.limit_for(device_id)

    def device_id(self, daemon: Daemon) -> str | None:
        return daemon.config.device or self._first_device

    def device(self, daemon: Daemon) -> DeviceMemory | None:
        return self._devices.get(daemon.config.device or self._first_device)

    def measured(self, daemon: Daemon) -> int | None:
        """What the probe says the daemon's process holds on its device now."""
        if daemon.identity is None or daemon.pid is None:
            return None
        device = self.device(daemon)
        if device is None:
            return None
        measured = device.by_pid.get(daemon.pid)
        if measured is None:
            # Hidden from the probe (a container without the host's pids):
            # the daemon's own word is the next best thing.
            measured = daemon.mem.get("rss" if device.id == "host" else "cuda")
        return measured

    def accounted(self, daemon: Daemon) -> int:
        """What the broker counts the daemon as holding: its tier, or the tier it moves to."""
        footprint = daemon.footprint
        if daemon.target is not None and DEPTH[daemon.target] < DEPTH[daemon.tier]:
            held = footprint.at(daemon.target)  # moving up: its room is reserved
        else:
            held = footprint.at(daemon.tier)  # moving down: counted until confirmed
        return held + sum(request.reserved for request in daemon.running.values())

    def usage(self, daemon: Daemon) -> int:
        measured = self.measured(daemon)
        accounted = self.accounted(daemon)
        return accounted if measured is None else max(accounted, measured)

    def on_device(self, device: DeviceMemory) -> list[Daemon]:
        daemons = self._on_device.get(device.id)
        if daemons is None:
            daemons = self._on_device[device.id] = [
                d for d in self.daemons.values() if self.device_id(d) == device.id]
        return daemons

    def external(self, device: DeviceMemory, counted: bool = True) -> int:
        """Memory on the device held by processes other than the daemons.

        counted: 0 where the device's limit says to ignore it.
        """
        if counted:
            limit = self.limit(device.id)
            if limit is None or limit.external != "count":
                return 0
        ours = sum(device.by_pid.get(d.pid, 0) for d in self.on_device(device)
                   if d.identity is not None and d.pid is not None)
        return max(0, device.used - ours)

    def committed(self, device: DeviceMemory) -> int:
        return self.external(device) + sum(self.usage(d) for d in self.on_device(device))

    def pending_frees(self, device: DeviceMemory) -> int:
        """Bytes that moves already under way on the device will give back."""
        return sum(max(0, self.usage(d) - d.footprint.at(d.target))
                   for d in self.on_device(device)
                   if d.target is not None and DEPTH[d.target] > DEPTH[d.tier])

    def device_rows(self) -> list[dict]:
        """Each device for `ps`: its figures, threshold and what is committed against it."""
        rows = []
        for device in self.reading.devices:
            limit = self.limit(device.id)
            row = dict(id=device.id, name=device.name, total=device.total, used=device.used,
                       free=device.free, external=self.external(device, counted=False))
            if limit is not None:
                row.update(threshold=limit.budget(device.total),
                           threshold_text=limit.describe(device.total),
                           external_counted=limit.external == "count",
                           committed=self.committed(device))
            rows.append(row)
        return rows
