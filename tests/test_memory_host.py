"""The memory manager end to end: a real `modelhost up`, daemons that really hold memory.

There is no GPU here, so the broker probes host memory (`probe: host`) and
counts only its daemons against the threshold (`external: ignore`: the rest
of this machine moves all the time). Each daemon runs the memory test engine
(tests/engines/memory_engine.py), whose load() touches `resident_mib` of
numpy memory, and whose offload() is a stand-in that parks it in a file.

A sampler thread reads the daemons' resident sets with psutil every 20 ms,
independently of the broker, and the tests assert that their sum never went
over the threshold.
"""

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import modelhost
from modelhost.protocol import Tier

from conftest import ENGINES

pytestmark = pytest.mark.slow

MiB = 2**20
THRESHOLD_MIB = 600
# A daemon process with numpy and pyzmq imported holds about 70 MiB before it loads
# anything; declared footprints include it.
RESIDENT_MIB = 160
DECLARED = "{resident: 240MiB, peak: 60MiB}"


def memory_daemon(name, engine="MemoryEngine", resident_mib=RESIDENT_MIB, declared=DECLARED,
                  options=None, **settings):
    options = dict({"resident_mib": resident_mib}, **(options or {}))
    lines = ["  {}:".format(name),
             "    engine: memory_engine:{}".format(engine),
             "    pythonpath: [{}]".format(ENGINES),
             "    python: {}".format(sys.executable),
             "    venv: false",
             "    options: {{{}}}".format(", ".join("{}: {}".format(k, v)
                                                   for k, v in options.items())),
             "    memory: {}".format(declared)]
    lines += ["    {}: {}".format(key, value) for key, value in settings.items()]
    return "\n".join(lines) + "\n"


BROKER = {"memory": "{{probe: host, threshold: {}MiB, external: ignore, sample_s: 0.05}}".format(
    THRESHOLD_MIB)}


class Sampler(threading.Thread):
    """The daemons' total resident set, sampled from outside the broker."""

    def __init__(self, host):
        super().__init__(daemon=True)
        self.host = host
        self.peak = 0
        self.samples = 0
        self.stopping = False
        self.pids = set()

    def run(self):
        last_ps = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now - last_ps > 0.2:  # daemons restart: learn their pids again
                try:
                    self.pids = {d["pid"] for d in self.host.ps()["daemons"] if d["pid"]}
                except modelhost.ModelhostError:
                    pass
                last_ps = now
            total = 0
            for pid in list(self.pids):
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.samples += 1
            time.sleep(0.02)

    def stop(self):
        self.stopping = True
        self.join()
        return self.peak


def start(make_host, daemons, broker=None):
    host = make_host(daemons, dict(BROKER, **(broker or {}))).start()
    host.wait_for(lambda status: all(
        d["state"] in ("ready", "unloaded", "offloaded") for d in status["daemons"]),
        what="daemons to register and preload")
    return host


def tiers(host):
    return {d["name"]: d["tier"] for d in host.ps()["daemons"]}


def test_two_that_fit_stay_resident_and_serve_concurrently(make_host):
    host = start(make_host, [memory_daemon("a"), memory_daemon("b")])
    assert tiers(host) == {"a": Tier.RESIDENT, "b": Tier.RESIDENT}
    sampler = Sampler(host)
    sampler.start()
    client = host.client()
    with ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        results = list(pool.map(
            lambda name: host.client().call(name, "work", seconds=1.0, peak_mib=30),
            ["a", "b", "a", "b"]))
        took = time.monotonic() - started
    assert [r["resident_mib"] for r in results] == [RESIDENT_MIB] * 4
    assert took < 3.5  # a and b ran side by side: 2 rounds of 1 s, not 4
    status = host.ps()
    assert {d["name"]: (d["tier"], d["loads"], d["evictions"]) for d in status["daemons"]} == {
        "a": (Tier.RESIDENT, 1, 0), "b": (Tier.RESIDENT, 1, 0)}
    assert sampler.stop() <= THRESHOLD_MIB * MiB
    client.close()


def test_three_that_do_not_fit_are_served_with_evictions_under_the_threshold(make_host):
    host = start(make_host, [memory_daemon("a"), memory_daemon("b"),
                             memory_daemon("c", preload="false")])
    assert sorted(tiers(host).values()) == [Tier.RESIDENT, Tier.RESIDENT, Tier.UNLOADED]
    sampler = Sampler(host)
    sampler.start()
    order = ["c", "a", "b", "c", "b", "a", "c"]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(
            lambda name: host.client().call(name, "work", seconds=0.3, peak_mib=30,
                                            timeout=60), order))
    assert len(results) == len(order)
    peak = sampler.stop()
    status = host.ps()
    assert sum(d["evictions"] for d in status["daemons"]) >= 2
    assert peak <= THRESHOLD_MIB * MiB, "sampled {:.0f} MiB over {} MiB".format(
        peak / MiB, THRESHOLD_MIB)
    assert sampler.samples > 50
    device, = status["memory"]["devices"]
    assert device["threshold"] == THRESHOLD_MIB * MiB and device["committed"] <= device[
        "threshold"]
    # Offloading was enough: no process had to stop.
    assert all(d["restarts"] == 0 for d in status["daemons"])
    for row in status["daemons"]:
        measured = row["footprint"]["measured"]
        assert RESIDENT_MIB * MiB < measured["resident"] < 260 * MiB
        if measured["offloaded"] is not None:
            assert measured["offloaded"] < 100 * MiB  # the offload really freed memory


def test_an_unload_that_frees_nothing_is_escalated_to_a_stop(make_host):
    host = start(make_host, [
        memory_daemon("a", engine="MemoryEngineNoOffload", options={"leak_on_unload": "true"}),
        memory_daemon("b"), memory_daemon("c", preload="false")])
    client = host.client()
    client.call("b", "work", priority="interactive")  # b serves urgent work: a is the victim
    sampler = Sampler(host)
    sampler.start()
    assert client.call("c", "work", peak_mib=20, timeout=60)["resident_mib"] == RESIDENT_MIB
    a = host.daemon("a")
    assert a["tier"] == Tier.STOPPED and a["state"] == "stopped"
    assert a["footprint"]["measured"]["unloaded"] > RESIDENT_MIB * MiB  # remembered
    assert "still holds" in host.log()
    assert sampler.stop() <= THRESHOLD_MIB * MiB
    # Called again, its process is started again and serves.
    assert client.call("a", "work", timeout=60)["resident_mib"] == RESIDENT_MIB
    assert host.daemon("a")["tier"] == Tier.RESIDENT


def test_a_pinned_daemon_is_never_evicted_and_what_never_fits_fails_fast(make_host):
    host = start(make_host, [memory_daemon("a", pin="true"), memory_daemon("b"),
                             memory_daemon("c", preload="false"),
                             memory_daemon("huge", declared="{resident: 500MiB}")])
    client = host.client()
    for name in ["c", "b", "c", "b"]:
        client.call(name, "work", timeout=60)
    a = host.daemon("a")
    assert (a["tier"], a["evictions"], a["pinned"]) == (Tier.RESIDENT, 0, True)
    started = time.monotonic()
    with pytest.raises(modelhost.InsufficientMemory) as caught:
        client.call("huge", "work", timeout=60)
    assert time.monotonic() - started < 2.0
    assert "never fit" in str(caught.value) and "pinned daemons (a)" in str(caught.value)
    assert client.call("b", "work")["resident_mib"] == RESIDENT_MIB  # everything else works


def test_interactive_calls_overtake_queued_batch_calls_and_batch_still_finishes(make_host):
    host = start(make_host, [memory_daemon("a")])
    finished = []
    lock = threading.Lock()

    def run(tag, priority, seconds):
        host.client().call("a", "work", seconds=seconds, priority=priority, timeout=60)
        with lock:
            finished.append(tag)

    # Each step waits for the broker to show the one before it (not a sleep), so that a
    # slow machine cannot reorder them: batch0 runs, three batch calls queue behind it,
    # then the interactive call arrives while batch0 still runs.
    threads = [threading.Thread(target=run, args=("batch0", "batch", 3.0))]
    threads[0].start()
    host.wait_for(lambda status: host.daemon("a")["running"] == 1, what="batch0 running")
    for i in range(1, 4):
        threads.append(threading.Thread(target=run, args=("batch%d" % i, "batch", 0.2)))
        threads[-1].start()
    host.wait_for(lambda status: host.daemon("a")["queued"] == 3, what="three batch calls queued")
    threads.append(threading.Thread(target=run, args=("chat", "interactive", 0.0)))
    threads[-1].start()
    for thread in threads:
        thread.join(30)
    assert finished[:2] == ["batch0", "chat"]
    assert sorted(finished) == ["batch0", "batch1", "batch2", "batch3", "chat"]


def test_load_unload_pin_and_idle_ttl_from_the_command_line(make_host):
    host = start(make_host, [memory_daemon("a", preload="false"),
                             memory_daemon("b", idle_ttl_s=1.5)])

    def cli(*args):
        import subprocess
        return subprocess.run([sys.executable, "-m", "modelhost", *args, "--endpoint",
                               host.endpoint], capture_output=True, text=True, timeout=60)

    assert tiers(host)["a"] == Tier.UNLOADED
    done = cli("load", "a")
    assert done.returncode == 0, done.stderr
    assert tiers(host)["a"] == Tier.RESIDENT
    assert cli("pin", "a").returncode == 0
    refused = cli("unload", "a")
    assert refused.returncode != 0 and "pinned" in refused.stderr + refused.stdout
    assert cli("unpin", "a").returncode == 0
    assert cli("unload", "a").returncode == 0
    assert tiers(host)["a"] == Tier.UNLOADED
    # b unloads itself 1.5 s after its last call ends.
    host.client().call("b", "work", seconds=0.2)
    assert 0 < host.daemon("b")["ttl_s"] <= 1.5
    host.wait_for(lambda status: tiers(host)["b"] == Tier.UNLOADED, timeout=10,
                  what="b's idle TTL")
    shown = cli("ps")
    assert shown.returncode == 0 and "unloaded" in shown.stdout


def test_measured_footprints_survive_a_broker_restart(make_host):
    host = start(make_host, [memory_daemon("a")])
    host.client().call("a", "work", seconds=0.5, peak_mib=50)
    peak = host.daemon("a")["footprint"]["measured"]["peak"]
    assert 45 * MiB <= peak <= 120 * MiB
    broker_pid = host.ps()["broker"]["pid"]
    time.sleep(1.2)  # the broker saves on its heartbeat
    psutil.Process(broker_pid).kill()
    host.wait_for(lambda status: status["broker"]["pid"] != broker_pid, what="a new broker")
    assert host.daemon("a")["footprint"]["measured"]["peak"] == peak  # read from the state dir
    # The daemon kept its weights and registers again with them.
    host.wait_for(lambda status: tiers(host)["a"] == Tier.RESIDENT, what="a to re-register")
    assert host.daemon("a")["loads"] == 1


def _cuda_available():
    try:
        import pynvml
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU, torch and nvidia-ml-py")
def test_on_a_gpu_nvml_sees_the_daemons_and_eviction_frees_device_memory(make_host):
    """Three CUDA daemons of 2 GiB under a threshold of 5 GiB above what the GPU already
    holds: NVML reads each daemon's pid, and a third is served by offloading another."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used_before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
    # A CUDA context costs a few hundred MiB per process; declared footprints include it.
    threshold = used_before + 5 * 2**30 + 1500 * MiB

    def cuda_daemon(name, **settings):
        lines = ["  {}:".format(name), "    engine: cuda_engine:CudaEngine",
                 "    pythonpath: [{}]".format(ENGINES), "    python: {}".format(sys.executable),
                 "    venv: false", "    options: {resident_mib: 2048}",
                 "    memory: {resident: 2600MiB, peak: 300MiB}", "    device: gpu0"]
        lines += ["    {}: {}".format(key, value) for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    host = make_host([cuda_daemon("a"), cuda_daemon("b"), cuda_daemon("c", preload="false")],
                     {"memory": "{{probe: nvml, threshold: {}, external: count}}".format(
                         threshold)}).start()
    host.wait_for(lambda status: all(d["state"] in ("ready", "unloaded")
                                     for d in status["daemons"]), timeout=120,
                  what="CUDA daemons to load")
    status = host.ps()
    assert status["memory"]["probe"] == "nvml"
    device = status["memory"]["devices"][0]
    assert device["id"] == "gpu0" and device["threshold"] == threshold
    rows = {d["name"]: d for d in status["daemons"]}
    assert rows["a"]["memory_bytes"] >= 2048 * MiB and rows["b"]["memory_bytes"] >= 2048 * MiB
    client = host.client()
    assert client.call("c", "work", peak_mib=256, timeout=120)["device"].startswith("cuda")
    rows = {d["name"]: d for d in host.ps()["daemons"]}
    moved = [name for name in "ab" if rows[name]["tier"] != Tier.RESIDENT]
    assert len(moved) == 1
    assert rows[moved[0]]["footprint"]["measured"][rows[moved[0]]["tier"]] < 1024 * MiB
    assert pynvml.nvmlDeviceGetMemoryInfo(handle).used <= threshold
