"""The daemon end of the memory manager: tier commands, state messages, memory reports.

A real daemon process (`python -m modelhost.daemons.run`) runs the memory test
engine against a plain ROUTER socket that plays the broker, so these tests
check the wire contract without any broker code. "Memory" is host RAM here:
the engine's resident_mib really shows in the process's RSS.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import zmq

from modelhost import protocol

pytestmark = pytest.mark.slow  # real daemon processes

ENGINES = Path(__file__).resolve().parent / "engines"
MiB = 2**20
TIMEOUT_S = 20.0

TRANSITIONAL = ("loading", "onloading", "offloading", "unloading")
MEM_KEYS = {"rss", "rss_peak", "cuda", "cuda_peak"}
STATE_KEYS = {"op", "v", "state", "tier", "took_s", "mem", "loads", "facts", "error", "failed"}


class FakeBroker(object):
    """A ROUTER bound where a daemon connects, and one daemon process started against it."""

    _ids = itertools.count(1)

    def __init__(self, engine="memory_engine:MemoryEngine", python=sys.executable,
                 concurrency=1, **options):
        self.dir = Path(tempfile.mkdtemp(prefix="mh-t-", dir="/tmp"))
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # As the broker does: a slot that has not connected yet raises instead
        # of silently dropping the call.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        endpoint = "ipc://{}/backend.sock".format(self.dir)
        self.router.bind(endpoint)
        spec = {"name": "mem", "engine": engine, "options": options, "backend": endpoint,
                "pythonpath": [str(ENGINES)], "concurrency": concurrency,
                "heartbeat_s": 0.2, "liveness": 1000, "log_level": "debug"}
        self.log_path = self.dir / "daemon.log"
        self._log = open(str(self.log_path), "wb")
        env = dict(os.environ, MODELHOST_DAEMON_SPEC=json.dumps(spec))
        self.process = subprocess.Popen([str(python), "-m", "modelhost.daemons.run", "mem"],
                                        env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.heartbeats = []
        self.replies = []  # terminal replies not yet asked for
        self.registration = self.expect(op="register")
        self.control = self.registration["_from"]
        self.slots = self.registration["slots"]

    def log(self):
        return self.log_path.read_text(errors="replace")

    def receive(self, deadline):
        """The next message other than a heartbeat, as its header plus `_from`."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.router.poll(left * 1000):
                raise AssertionError("the daemon said nothing in time\n--- log ---\n" +
                                     self.log()[-4000:])
            frames = protocol.recv(self.router)
            header, _ = protocol.decode(frames[1:])
            # What a real runtime sends passes the broker's schema for its kind.
            (protocol.check_reply if "kind" in header else protocol.check_daemon_message)(header)
            header["_from"] = frames[0].bytes
            if header.get("op") == protocol.HEARTBEAT:
                self.heartbeats.append(header)
                continue
            return header

    def expect(self, timeout=TIMEOUT_S, **fields):
        """The next message; it must match `fields`."""
        header = self.receive(time.monotonic() + timeout)
        for key, value in fields.items():
            assert header.get(key) == value, "expected {}={!r} in {}".format(key, value, header)
        return header

    def tier(self, target):
        protocol.send(self.router, [self.control] + protocol.encode(
            {"op": protocol.TIER, "tier": target}))

    def move(self, target, *states):
        """Ask for `target`; the state messages must be `states`, in order; returns them."""
        self.tier(target)
        return [self.expect(op="state", state=state) for state in states]

    def start_call(self, method, slot=0, **args):
        request_id = next(self._ids)
        frames = [self.slots[slot]] + protocol.encode(
            {"op": protocol.CALL, "id": request_id, "client": b"client-1", "method": method,
             "args": args})
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                protocol.send(self.router, frames)
                return request_id
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def result_of(self, request_id, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while True:
            header = self.receive(deadline)
            if header.get("kind") in protocol.TERMINAL_KINDS and header.get("id") == request_id:
                return header
            assert header.get("kind") not in protocol.TERMINAL_KINDS, header
            if header.get("op") == protocol.STATE:
                self.replies.append(header)

    def call(self, method, slot=0, **args):
        return self.result_of(self.start_call(method, slot, **args))

    def cancel(self, request_id):
        protocol.send(self.router, [self.control] + protocol.encode(
            {"op": protocol.CANCEL, "id": request_id, "client": b"client-1"}))

    def rss(self):
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.router.close()
        self.context.term()
        shutil.rmtree(str(self.dir), ignore_errors=True)


@pytest.fixture
def start():
    brokers = []

    def make(**settings):
        broker = FakeBroker(**settings)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


def check_mem(mem):
    assert set(mem) == MEM_KEYS
    assert mem["rss"] > 0 and mem["rss_peak"] >= mem["rss"] - MiB
    assert mem["cuda"] is None and mem["cuda_peak"] is None  # no torch CUDA in these daemons


def check_state(message, state, tier):
    assert set(message) >= STATE_KEYS
    assert (message["state"], message["tier"]) == (state, tier), message
    check_mem(message["mem"])
    if state in TRANSITIONAL:
        assert message["took_s"] is None
    else:
        assert message["took_s"] >= 0


# --- registration -----------------------------------------------------------------


def test_a_daemon_registers_unloaded_with_its_tiers_and_memory(start):
    daemon = start(resident_mib=8)
    registration = daemon.registration
    assert registration["state"] == "unloaded" and registration["tier"] == "unloaded"
    assert registration["tiers"] == ["resident", "offloaded", "unloaded"]
    assert registration["loads"] == 0 and registration["error"] is None
    assert sorted(registration["methods"]) == ["info", "work"]
    check_mem(registration["mem"])
    assert abs(registration["mem"]["rss"] - daemon.rss()) < 16 * MiB


def test_an_engine_without_offload_has_two_tiers(start):
    daemon = start(engine="memory_engine:MemoryEngineNoOffload", resident_mib=8)
    assert daemon.registration["tiers"] == ["resident", "unloaded"]


def test_heartbeats_carry_memory(start):
    daemon = start(resident_mib=8)
    deadline = time.monotonic() + 5
    while len(daemon.heartbeats) < 2 and time.monotonic() < deadline:
        try:
            daemon.receive(time.monotonic() + 0.5)
        except AssertionError:
            pass
    assert len(daemon.heartbeats) >= 2
    for heartbeat in daemon.heartbeats:
        assert heartbeat["state"] == "unloaded" and heartbeat["running"] == 0
        check_mem(heartbeat["mem"])


# --- transitions ------------------------------------------------------------------


def walk_the_tiers(daemon):
    """unloaded -> resident -> offloaded -> resident -> unloaded, checking memory at each."""
    size = 200 * MiB
    before = daemon.rss()

    loading, ready = daemon.move("resident", "loading", "ready")
    check_state(loading, "loading", "unloaded")
    check_state(ready, "ready", "resident")
    assert ready["loads"] == 1 and ready["error"] is None and ready["failed"] is None
    assert ready["facts"] == {"resident_mib": 200, "loads": 1}
    assert ready["mem"]["rss"] >= before + 0.9 * size
    assert daemon.rss() >= before + 0.9 * size
    resident = daemon.rss()

    offloading, offloaded = daemon.move("offloaded", "offloading", "offloaded")
    check_state(offloading, "offloading", "resident")
    check_state(offloaded, "offloaded", "offloaded")
    assert offloaded["mem"]["rss"] <= resident - 0.9 * size
    assert daemon.rss() <= resident - 0.9 * size

    onloading, ready = daemon.move("resident", "onloading", "ready")
    check_state(onloading, "onloading", "offloaded")
    check_state(ready, "ready", "resident")
    assert ready["loads"] == 1  # onload is not a load
    assert daemon.rss() >= before + 0.9 * size

    unloading, unloaded = daemon.move("unloaded", "unloading", "unloaded")
    check_state(unloading, "unloading", "resident")
    check_state(unloaded, "unloaded", "unloaded")
    assert unloaded["mem"]["rss"] <= resident - 0.9 * size
    assert daemon.rss() <= resident - 0.9 * size


def test_tiers_move_memory_and_report_each_step(start):
    walk_the_tiers(start(resident_mib=200))


def test_tiers_on_python_37(start, test_venvs):
    walk_the_tiers(start(resident_mib=200, python=test_venvs["py37"] / "bin" / "python"))


def test_unload_from_offloaded(start):
    daemon = start(resident_mib=100)
    daemon.move("resident", "loading", "ready")
    daemon.move("offloaded", "offloading", "offloaded")
    unloading, unloaded = daemon.move("unloaded", "unloading", "unloaded")
    check_state(unloading, "unloading", "offloaded")
    check_state(unloaded, "unloaded", "unloaded")
    assert not list((daemon.dir).glob("**/*.npy"))
    daemon.move("resident", "loading", "ready")  # and it loads again
    assert daemon.call("info")["value"]["loads"] == 2


def test_a_leaking_unload_frees_nothing(start):
    daemon = start(resident_mib=200, leak_on_unload=True)
    daemon.move("resident", "loading", "ready")
    resident = daemon.rss()
    _, unloaded = daemon.move("unloaded", "unloading", "unloaded")
    assert unloaded["tier"] == "unloaded"  # the daemon believes it; the probe knows better
    assert unloaded["mem"]["rss"] >= resident - 20 * MiB
    assert daemon.rss() >= resident - 20 * MiB


def test_commands_are_served_in_arrival_order(start):
    daemon = start(resident_mib=16)
    for target in ("resident", "offloaded", "resident", "unloaded", "resident"):
        daemon.tier(target)
    seen = [(m["state"], m["tier"]) for m in (daemon.expect(op="state") for _ in range(10))]
    assert seen == [("loading", "unloaded"), ("ready", "resident"),
                    ("offloading", "resident"), ("offloaded", "offloaded"),
                    ("onloading", "offloaded"), ("ready", "resident"),
                    ("unloading", "resident"), ("unloaded", "unloaded"),
                    ("loading", "unloaded"), ("ready", "resident")]


def test_the_same_tier_is_only_reported(start):
    daemon = start(resident_mib=8)
    (unloaded,) = daemon.move("unloaded", "unloaded")
    check_state(unloaded, "unloaded", "unloaded")
    assert unloaded["took_s"] == 0
    daemon.move("resident", "loading", "ready")
    (ready,) = daemon.move("resident", "ready")
    assert ready["took_s"] == 0 and ready["loads"] == 1


def test_offload_of_an_engine_without_it_fails_and_stays_resident(start):
    daemon = start(engine="memory_engine:MemoryEngineNoOffload", resident_mib=8)
    daemon.move("resident", "loading", "ready")
    (ready,) = daemon.move("offloaded", "ready")
    check_state(ready, "ready", "resident")
    assert ready["failed"] == "offloaded"
    assert ready["error"].startswith("offload failed: NotImplementedError: ")
    assert daemon.call("info")["kind"] == "result"  # still serving


@pytest.mark.parametrize("target", ["stopped", "nowhere", None])
def test_a_tier_the_daemon_cannot_reach_fails_and_stays(start, target):
    daemon = start(resident_mib=8)
    (unloaded,) = daemon.move(target, "unloaded")
    assert unloaded["tier"] == "unloaded" and unloaded["failed"] == target
    assert unloaded["error"].startswith("tier failed: ValueError: ")


def test_offloading_an_unloaded_daemon_fails(start):
    daemon = start(resident_mib=8)
    (unloaded,) = daemon.move("offloaded", "unloaded")
    assert unloaded["failed"] == "offloaded" and "offload" in unloaded["error"]


def test_a_failed_load_is_reported_and_retried(start):
    daemon = start(resident_mib=8, fail_loads=1)
    loading, failed = daemon.move("resident", "loading", "failed")
    check_state(failed, "failed", "unloaded")
    assert failed["error"] == "load failed: RuntimeError: this load fails on purpose"
    assert failed["loads"] == 0
    refused = daemon.call("info")
    assert refused["code"] == "daemon_unavailable" and "this load fails on purpose" in \
        refused["message"]
    # A FAILED daemon asked for resident tries again.
    _, ready = daemon.move("resident", "loading", "ready")
    assert ready["error"] is None and ready["loads"] == 1


def test_an_engine_that_cannot_be_created_stays_failed(start):
    daemon = start(engine="memory_engine:NoSuchEngine")
    assert daemon.registration["state"] == "failed"
    assert daemon.registration["tiers"] == ["resident", "unloaded"]
    (failed,) = daemon.move("resident", "failed")
    assert failed["tier"] == "unloaded"
    assert failed["error"].startswith("load failed: RuntimeError: cannot create engine")


# --- calls and tiers --------------------------------------------------------------


def test_calls_are_served_only_when_resident(start):
    daemon = start(resident_mib=8)
    refused = daemon.call("info")
    assert refused["kind"] == "error" and refused["code"] == "daemon_unavailable"
    assert "unloaded" in refused["message"]
    assert set(refused["mem"]) == {"rss_peak", "cuda_peak"}
    daemon.move("resident", "loading", "ready")
    assert daemon.call("info")["value"]["where"] == "resident"
    daemon.move("offloaded", "offloading", "offloaded")
    assert daemon.call("info")["code"] == "daemon_unavailable"
    daemon.move("resident", "onloading", "ready")
    assert daemon.call("info")["value"]["holds_mib"] == 8


def test_a_downward_move_waits_for_the_running_call(start):
    daemon = start(resident_mib=8, concurrency=2)
    daemon.move("resident", "loading", "ready")
    request_id = daemon.start_call("work", seconds=0.6)
    time.sleep(0.1)
    daemon.tier("unloaded")
    daemon.expect(op="state", state="unloading")
    # Refused from the moment the transition starts, on the other slot.
    assert daemon.call("info", slot=1)["code"] == "daemon_unavailable"
    assert daemon.result_of(request_id)["kind"] == "result"  # the running call finished
    unloaded = daemon.replies.pop() if daemon.replies else daemon.expect(op="state")
    assert unloaded["state"] == "unloaded" and unloaded["took_s"] >= 0.3


def test_terminal_replies_carry_the_peak_of_their_call(start):
    daemon = start(resident_mib=16)
    _, ready = daemon.move("resident", "loading", "ready")
    base = ready["mem"]["rss"]
    big = daemon.call("work", peak_mib=150, seconds=0.05)
    assert big["kind"] == "result" and big["value"]["peak_mib"] == 150
    assert set(big["mem"]) == {"rss_peak", "cuda_peak"} and big["mem"]["cuda_peak"] is None
    assert big["mem"]["rss_peak"] >= base + 140 * MiB
    # The high-water mark is reset when a call starts alone.
    small = daemon.call("work", peak_mib=0)
    assert small["mem"]["rss_peak"] < big["mem"]["rss_peak"] - 100 * MiB


def test_cancelled_and_failed_calls_carry_peaks_too(start):
    daemon = start(resident_mib=8)
    daemon.move("resident", "loading", "ready")
    request_id = daemon.start_call("work", seconds=10.0, peak_mib=50)
    time.sleep(0.3)
    daemon.cancel(request_id)
    cancelled = daemon.result_of(request_id)
    assert cancelled["kind"] == "cancelled" and cancelled["mem"]["rss_peak"] >= 50 * MiB
    failed = daemon.call("work", peak_mib="many")
    assert failed["code"] == "bad_arguments" and "rss_peak" in failed["mem"]


def test_sigterm_unloads_and_exits(start):
    daemon = start(resident_mib=8)
    daemon.move("resident", "loading", "ready")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(10) == 0
    assert "unload at exit failed" not in daemon.log()
