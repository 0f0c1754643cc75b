"""Memory probes: what each device holds, and what each daemon process uses of it.

One interface, two probes:
- NvmlProbe reads NVIDIA GPUs through NVML (the nvidia-ml-py bindings):
  total/used/free per GPU, and the memory each daemon pid holds on it;
- HostProbe reads host memory through psutil (available memory, each pid's
  resident set) on a machine without a GPU, so the same policy runs, and is
  tested, on a CPU machine.

`choose_probe()` picks NVML when a driver answers and says why it did not
otherwise. An NVML failure never raises out of a probe: a container that
hides pids, for example, degrades to the whole-GPU figures, with one warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Protocol

log = logging.getLogger("modelhost.broker")


@dataclass(frozen=True)
class DeviceMemory:
    id: str  # "gpu0", "gpu1", ... or "host": what the configuration names
    name: str  # "gpu0 (NVIDIA H100 80GB HBM3)" or "host"
    total: int  # bytes
    used: int  # bytes, by everything on the device
    free: int  # bytes the device can still give
    # pid -> bytes that process holds on this device. A pid missing here could
    # not be read (gone, or hidden from the probe by the driver).
    by_pid: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryReading:
    devices: list[DeviceMemory]

    @property
    def by_pid(self) -> dict[int, int]:
        """pid -> bytes held on all devices together."""
        total: dict[int, int] = {}
        for device in self.devices:
            for pid, used in device.by_pid.items():
                total[pid] = total.get(pid, 0) + used
        return total


class MemoryProbe(Protocol):
    kind: str  # "nvml" or "host"
    reason: str  # why this probe, for the broker's start-up line

    def read(self, pids: Iterable[int]) -> MemoryReading: ...


class HostProbe:
    kind = "host"

    def __init__(self, reason: str = "configured"):
        import psutil

        self._psutil = psutil
        self.reason = reason

    def read(self, pids: Iterable[int]) -> MemoryReading:
        psutil = self._psutil
        memory = psutil.virtual_memory()
        by_pid = {}
        for pid in pids:
            try:
                by_pid[pid] = psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return MemoryReading([DeviceMemory("host", "host", memory.total,
                                           memory.total - memory.available, memory.available,
                                           by_pid)])


class NvmlProbe:
    kind = "nvml"

    def __init__(self, nvml, reason: str):
        # `nvml` is the pynvml module, already initialized (passed in so that
        # tests can hand over a stand-in for a driver they do not have).
        self._nvml = nvml
        self.reason = reason
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                         for i in range(nvml.nvmlDeviceGetCount())]
        self._ids = ["gpu{}".format(i) for i in range(len(self._handles))]
        self._names = ["gpu{} ({})".format(i, _text(nvml.nvmlDeviceGetName(handle)))
                       for i, handle in enumerate(self._handles)]
        self._warned = False

    def read(self, pids: Iterable[int]) -> MemoryReading:
        nvml = self._nvml
        wanted = set(pids)
        devices = []
        for device_id, name, handle in zip(self._ids, self._names, self._handles):
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                self._warn_once("cannot read {}: {}".format(name, exc))
                continue
            by_pid: dict[int, int] = {}
            devices.append(DeviceMemory(device_id, name, info.total, info.used, info.free, by_pid))
            try:
                processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle)) + \
                    list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
            except nvml.NVMLError as exc:
                self._warn_once("per-process GPU memory is not readable ({}); using whole-GPU "
                                "figures only".format(exc))
                continue
            for process in processes:
                used = process.usedGpuMemory
                # None: the driver hides it (a container without the host's pid
                # namespace, or a process of another user).
                if process.pid in wanted and used is not None:
                    by_pid[process.pid] = by_pid.get(process.pid, 0) + used
        return MemoryReading(devices)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("memory probe: %s", message)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def choose_probe(kind: str = "auto", nvml=None) -> MemoryProbe:
    """The probe the configuration asks for ("auto", "nvml" or "host"), with the reason.

    auto and nvml use NVML when a driver answers with at least one GPU, and
    fall back to host memory otherwise: a broker without its GPU figures
    still routes, and says why in its start-up line.
    """
    if kind == "host":
        return HostProbe("configured (memory.probe: host)")
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return HostProbe("nvidia-ml-py is not installed; watching host memory instead")
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        return HostProbe("NVML is not available ({}); watching host memory instead".format(exc))
    if count == 0:
        return HostProbe("NVML found no GPU; watching host memory instead")
    return NvmlProbe(nvml, "NVML found {} GPU{}".format(count, "" if count == 1 else "s"))


def format_bytes(count: int | None) -> str:
    """1.5 GiB, 300 MiB, 12 KiB: sizes for people, in log lines and errors."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "B":
        return "{} B".format(int(value))
    return "{:.1f} {}".format(value, unit) if abs(value) < 10 else "{:.0f} {}".format(value, unit)
