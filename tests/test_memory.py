"""Memory probes: host memory for real; NVML through a stand-in where no driver is here."""

import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest

from modelhost.broker.memory import HostProbe, NvmlProbe, choose_probe

MiB = 2**20


def hold_memory(megabytes):
    """A separate process that keeps `megabytes` resident until killed."""
    code = ("import sys\nx = bytearray({} * 2**20)\n"
            "for i in range(0, len(x), 4096): x[i] = 1\n"
            "print('ready', flush=True)\nsys.stdin.read()\n").format(megabytes)
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_host_probe_sees_what_a_process_really_holds():
    holder = hold_memory(300)
    try:
        reading = HostProbe().read([holder.pid, 999999999])
    finally:
        holder.kill()
        holder.wait()
    assert 300 * MiB <= reading.by_pid[holder.pid] < 400 * MiB
    assert 999999999 not in reading.by_pid  # no such process: left out, no error
    (host,) = reading.devices
    assert host.name == "host" and 0 < host.free <= host.total and host.used >= 300 * MiB


class FakeNvml:
    """A stand-in for the pynvml module, for the paths a CPU machine cannot reach.

    It follows the real bindings' names and shapes: NVMLError, nvmlInit,
    nvmlDeviceGetCount, ...; memory info objects with total/used/free, and
    process objects with pid and usedGpuMemory (None when hidden).
    """

    class NVMLError(Exception):
        pass

    def __init__(self, gpus=(), init_error=None, processes_error=None):
        self.gpus = list(gpus)  # [(name, total, used, [(pid, used or None), ...])]
        self.init_error = init_error
        self.processes_error = processes_error

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self.gpus[handle][0].encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        _, total, used, _ = self.gpus[handle]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if self.processes_error:
            raise self.NVMLError(self.processes_error)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.gpus[handle][3]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []


def test_without_a_driver_the_host_probe_is_chosen_and_says_why():
    probe = choose_probe(nvml=FakeNvml(init_error="NVML Shared Library Not Found"))
    assert probe.kind == "host"
    assert "NVML is not available (NVML Shared Library Not Found)" in probe.reason
    assert choose_probe(nvml=FakeNvml(gpus=[])).reason.startswith("NVML found no GPU")


def test_nvml_probe_reads_each_gpu_and_sums_a_pid_across_gpus():
    nvml = FakeNvml(gpus=[("H100", 80 * 2**30, 30 * 2**30, [(11, 10 * 2**30), (12, 5 * 2**30)]),
                          ("H100", 80 * 2**30, 8 * 2**30, [(11, 2 * 2**30), (99, 1)])])
    probe = choose_probe(nvml=nvml)
    assert probe.kind == "nvml" and probe.reason == "NVML found 2 GPUs"
    reading = probe.read([11, 12])
    assert [d.name for d in reading.devices] == ["gpu0 (H100)", "gpu1 (H100)"]
    assert reading.devices[1].free == 72 * 2**30
    assert reading.by_pid == {11: 12 * 2**30, 12: 5 * 2**30}  # pid 99 was not asked for


def test_nvml_probe_degrades_to_whole_gpu_figures_when_pids_are_hidden(caplog):
    hidden = FakeNvml(gpus=[("A10", 24 * 2**30, 4 * 2**30, [(11, None)])])
    assert NvmlProbe(hidden, "test").read([11]).by_pid == {}  # hidden by the driver
    refused = FakeNvml(gpus=[("A10", 24 * 2**30, 4 * 2**30, [])],
                       processes_error="Not Supported")
    probe = NvmlProbe(refused, "test")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            reading = probe.read([11])
    assert reading.by_pid == {} and reading.devices[0].used == 4 * 2**30
    warnings = [r for r in caplog.records if "whole-GPU figures" in r.getMessage()]
    assert len(warnings) == 1  # said once, not every heartbeat


@pytest.mark.gpu
def test_nvml_probe_sees_a_cuda_allocation_of_a_process():
    probe = choose_probe()
    if probe.kind != "nvml":
        pytest.skip("no NVIDIA GPU here: " + probe.reason)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    code = ("import sys, torch\nx = torch.ones(512 * 2**20 // 4, device='cuda')\n"
            "torch.cuda.synchronize()\nprint('ready', flush=True)\nsys.stdin.read()\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        reading = probe.read([process.pid])
    finally:
        process.kill()
        process.wait()
    assert reading.by_pid.get(process.pid, 0) >= 512 * MiB
