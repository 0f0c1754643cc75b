"""Chaos on a real host: clients call while daemons and the broker are SIGKILLed.

Three daemons run tests/engines/chaos_engine.py (concurrency 1, 2 and 2), which writes
down every run of `work` (start, and finish just before it returns) per process.
Client threads, each with its own Client, call `work` with a unique tag; a chaos
thread SIGKILLs a daemon every second or two and the broker once (the supervisor
starts them again), once with a daemon killed while the broker is down.

What can honestly be asserted:
- each call ends exactly once, with its result or a typed error of the kinds a
  crash explains (daemon_crashed, request_lost, daemon_unavailable, timeout,
  broker_unavailable); on the wire each request id gets at most one terminal reply;
- a result reaches only its own caller: it carries the caller's tag;
- no tag runs twice (the run logs of every process, old and new);
- every run that finished was delivered to its caller, except where its daemon was
  SIGKILLed after finishing but before its reply could leave: within HANDOFF_S of the
  finish, or of the new broker's start when the broker was down at the finish (the
  reply waits in the daemon until a broker is there). Those are counted apart, not
  failed. So a run that finished while only the broker was down must be delivered.

The client socket is tapped (a thin wrapper that reads every frame the Client reads
and sends), because the Client itself silently drops replies for requests it no
longer waits for: a duplicate or misrouted terminal reply is only visible there.
"""

import collections
import os
import random
import signal
import threading
import time

import msgpack
import pytest
import zmq

import modelhost
from modelhost import protocol

from conftest import Host, daemon_yaml

pytestmark = pytest.mark.slow

CHAOS_S = 30.0  # how long the clients call and the chaos thread kills
CLIENTS = 6
CALL_TIMEOUT_S = 15.0
BROKER_KILL_AT_S = 10.0  # into the chaos
# A reply leaves its daemon within microseconds of the engine returning; a kill of the
# daemon this soon after a run finished may still have destroyed the reply (or the
# broker saw the process die before it read the reply, and answered daemon_crashed).
HANDOFF_S = 0.5
DAEMONS = {"c1": 1, "c2": 2, "c3": 2}  # name -> concurrency
# What a SIGKILLed daemon or broker explains. Anything else is a failure.
CRASH_OUTCOMES = {"DaemonCrashed", "RequestLost", "DaemonUnavailable", "Timeout",
                  "BrokerUnavailable"}


class Tap(object):
    """A client socket that records the header of every message it receives and sends."""

    def __init__(self, socket):
        self._socket = socket
        self.received = []  # (time, header)
        self.sent = []  # (time, header)
        self._in_message = {"recv": False, "send": False}

    def _note(self, way, frame, more):
        if not self._in_message[way]:
            data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
            try:
                header = msgpack.unpackb(data, raw=False)
            except Exception:
                header = {"undecodable": data[:100]}
            (self.received if way == "recv" else self.sent).append((time.monotonic(), header))
        self._in_message[way] = bool(more)

    def recv(self, flags=0, copy=True, track=False):
        frame = self._socket.recv(flags, copy=copy, track=track)
        more = frame.more if hasattr(frame, "more") else self._socket.getsockopt(zmq.RCVMORE)
        self._note("recv", frame, more)
        return frame

    def send(self, data, flags=0, copy=True, track=False):
        result = self._socket.send(data, flags, copy=copy, track=track)
        self._note("send", data, flags & zmq.SNDMORE)
        return result

    def __getattr__(self, name):
        return getattr(self._socket, name)


def tapped_client(endpoint):
    client = modelhost.Client(endpoint, timeout=CALL_TIMEOUT_S)
    tap = Tap(client._socket)
    client._socket = tap
    return client, tap


class Chaos(object):
    """The kills, with their times: what explains a lost reply."""

    def __init__(self, host, seed):
        self.host = host
        self.random = random.Random(seed)
        self.daemon_kills = []  # (time, name, pid)
        self.broker_down = []  # [killed at, new broker seen at or None]
        self.broker_pids = []
        self.stop = threading.Event()
        self.errors = []

    def pids(self, timeout=1.0):
        """{name: pid} of registered daemons, and the broker's pid; None while it is down."""
        try:
            with modelhost.Client(self.host.endpoint) as client:
                status = client.ps(timeout=timeout)
        except modelhost.ModelhostError:
            return None, None
        return ({d["name"]: d["pid"] for d in status["daemons"]
                 if d["pid"] and d["state"] in ("ready", "busy")}, status["broker"]["pid"])

    def kill_daemon(self, name, pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.daemon_kills.append((time.monotonic(), name, pid))

    def run(self, start):
        try:
            self._run(start)
        except Exception as exc:  # a bug in the test: fail it, do not hang it
            self.errors.append(repr(exc))

    def _run(self, start):
        known = {}
        broker_killed = False
        kill_broker_at = start + BROKER_KILL_AT_S
        while not self.stop.is_set():
            pause = self.random.uniform(0.8, 2.0)
            if not broker_killed:
                # On time: the callers make their calls long just before it.
                pause = max(0.0, min(pause, kill_broker_at - time.monotonic()))
            if self.stop.wait(pause):
                return
            daemons, broker = self.pids()
            if daemons:
                known = daemons
            if broker is not None and broker not in self.broker_pids:
                self.broker_pids.append(broker)
            if not broker_killed and time.monotonic() >= kill_broker_at and broker is not None:
                broker_killed = True
                os.kill(broker, signal.SIGKILL)
                self.broker_down.append([time.monotonic(), None])
                # One daemon dies while the broker is down: its finished replies wait
                # in it for a broker, so those die with it (and are excused). The one
                # with a single slot, so that most runs that finish now must arrive.
                time.sleep(0.2)
                if "c1" in known:
                    self.kill_daemon("c1", known["c1"])
                self._wait_for_new_broker(broker)
                continue
            # Every daemon up and busy when the broker dies: no daemon kills just before.
            quiet = 0 <= BROKER_KILL_AT_S - (time.monotonic() - start) <= 3.0
            if daemons and not quiet:
                name = self.random.choice(sorted(daemons))
                self.kill_daemon(name, daemons[name])

    def _wait_for_new_broker(self, old):
        while not self.stop.is_set():
            _, broker = self.pids(timeout=0.5)
            if broker is not None and broker != old:
                self.broker_down[-1][1] = time.monotonic()
                self.broker_pids.append(broker)
                return
            time.sleep(0.05)

    def broker_back_after(self, when):
        """`when`, or the moment a new broker was up if the broker was down at `when`."""
        for killed, back in self.broker_down:
            if killed <= when and (back is None or when <= back):
                return back if back is not None else float("inf")
        return when

    def broker_was_down(self, since, until):
        """Whether the broker was down at some moment of [since, until]."""
        for killed, back in self.broker_down:
            back = back if back is not None else float("inf")
            if killed <= until and back >= since:
                return True
        return False


class Caller(object):
    """One client thread: calls `work` with unique tags until told to stop."""

    def __init__(self, index, endpoint, seed, stop, start):
        self.start = start
        self.index = index
        self.endpoint = endpoint
        self.random = random.Random(seed)
        self.stop = stop
        self.calls = []  # dicts: tag, model, sent, ended, outcome, value, error
        self.tap = None
        self.errors = []
        self.thread = threading.Thread(target=self.run, name="caller-{}".format(index),
                                       daemon=True)

    def run(self):
        client, self.tap = tapped_client(self.endpoint)
        try:
            number = 0
            while not self.stop.is_set():
                number += 1
                tag = "t{}-{}".format(self.index, number)
                model = self.random.choice(sorted(DAEMONS))
                call = dict(tag=tag, model=model, sent=time.monotonic())
                self.calls.append(call)
                # Mostly short; long ones now and then, and in the seconds before the
                # broker's kill, so that calls are still running when it dies and
                # finish while it is down.
                soon = 0 <= BROKER_KILL_AT_S - (time.monotonic() - self.start) <= 1.5
                seconds = self.random.uniform(0.8, 2.0) if soon else \
                    self.random.uniform(0.5, 1.5) if self.random.random() < 0.1 else \
                    self.random.uniform(0.02, 0.3)
                try:
                    value = client.call(model, "work", tag=tag, seconds=seconds)
                    call.update(outcome="result", value=value)
                except modelhost.ModelhostError as exc:
                    call.update(outcome=type(exc).__name__, error=str(exc))
                call["ended"] = time.monotonic()
        except Exception as exc:  # not a ModelhostError: the test reports it
            self.errors.append(repr(exc))
        finally:
            client.close()


def read_runs(log_dir):
    """{tag: [(event, time, pid)]} from every process's run log."""
    runs = collections.defaultdict(list)
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 4:
                    runs[parts[1]].append((parts[0], float(parts[2]), int(parts[3])))
    return runs


def wire_problems(caller):
    """Terminal replies on the caller's socket: at most one per id, each with its tag."""
    tags, asked = {}, set()
    for _, header in caller.tap.sent:
        asked.add(header.get("id"))
        if header.get("op") == "call":
            args = header.get("args") or {}
            tags[header.get("id")] = args.get("tag")
    first_at = {}
    problems = []
    for when, header in caller.tap.received:
        if header.get("kind") not in protocol.TERMINAL_KINDS:
            continue
        request_id = header.get("id")
        if request_id not in asked:
            problems.append(("misrouted", None, header))  # for a request it never sent
            continue
        if request_id not in tags:
            continue  # not a call
        if request_id in first_at:
            problems.append(("duplicated", tags[request_id], dict(
                header, first_received=first_at[request_id], again=when)))
        first_at.setdefault(request_id, when)
        if header.get("kind") == "result":
            value = header.get("value")
            if not isinstance(value, dict) or value.get("tag") != tags[request_id]:
                problems.append(("misrouted", tags[request_id], header))
    return problems


def test_chaos_kills_lose_no_finished_work_and_run_nothing_twice(tmp_path, capsys):
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    restart = "{backoff_s: 0.2, max_backoff_s: 1.0, reset_after_s: 1.0}"
    host = Host([daemon_yaml(name, engine="chaos_engine:ChaosEngine", concurrency=concurrency,
                             max_queue=200, options="{{log_dir: {}}}".format(log_dir),
                             restart=restart)
                 for name, concurrency in DAEMONS.items()])
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))  # printed below
    try:
        host.start()
        host.wait_ready(*DAEMONS)
        chaos = Chaos(host, seed)
        stop = threading.Event()
        start = time.monotonic()
        callers = [Caller(index, host.endpoint, seed + index, stop, start)
                   for index in range(CLIENTS)]
        for caller in callers:
            caller.thread.start()
        chaos_thread = threading.Thread(target=chaos.run, args=(start,), daemon=True)
        chaos_thread.start()
        time.sleep(CHAOS_S)
        chaos.stop.set()
        chaos_thread.join(10)
        stop.set()
        # Each call ends by itself: its result, its timeout, or the broker's silence.
        for caller in callers:
            caller.thread.join(CALL_TIMEOUT_S + 15)
        hung = [caller.calls[-1] for caller in callers if caller.thread.is_alive()]
        # The host is whole again afterwards.
        host.wait_ready(*DAEMONS, timeout=30)
        with modelhost.Client(host.endpoint, timeout=10) as client:
            final = {name: client.call(name, "work", tag="final-" + name) for name in DAEMONS}
        time.sleep(0.2)
        report, failures = analyse(callers, chaos, read_runs(str(log_dir)))
        log = host.log()
    finally:
        host.stop()
    with capsys.disabled():
        print("\nchaos (seed {}):\n{}".format(seed, report))
    failures += ["a call never returned: {}".format(call) for call in hung]
    failures += ["a client thread failed: {}".format(e) for c in callers for e in c.errors]
    failures += ["the chaos thread failed: {}".format(e) for e in chaos.errors]
    failures += ["the final call to {} returned {}".format(name, value)
                 for name, value in final.items() if value.get("tag") != "final-" + name]
    if len(chaos.daemon_kills) < 3 or not chaos.broker_down or chaos.broker_down[0][1] is None:
        failures.append("the chaos did not happen as planned: {} daemon kills, broker down "
                        "{}".format(len(chaos.daemon_kills), chaos.broker_down))
    if failures:
        interesting = [line for line in log.splitlines() if (" ERROR " in line
                       and "killed by SIGKILL" not in line)
                       or "Traceback" in line or line.startswith(" ")][-40:]
        pytest.fail("chaos (seed {}):\n{}\n\nfailures:\n  {}\n\nhost log (errors):\n{}".format(
            seed, report, "\n  ".join(str(f)[:600] for f in failures[:40]),
            "\n".join(interesting)), pytrace=False)


def _relative(when, chaos):
    """A moment as seconds from the broker's kill, which most things here hinge on."""
    if not chaos.broker_down:
        return "{:.3f}".format(when)
    return "{:+.3f}s from the broker kill".format(when - chaos.broker_down[0][0])


def analyse(callers, chaos, runs):
    """(a report of the figures, a list of failures)."""
    failures = []
    calls = [call for caller in callers for call in caller.calls if "outcome" in call]
    by_tag = {call["tag"]: call for call in calls}
    outcomes = collections.Counter(call["outcome"] for call in calls)
    for call in calls:
        if call["outcome"] not in CRASH_OUTCOMES | {"result"}:
            failures.append("an outcome no crash explains: {}".format(call))
        if call["outcome"] == "result" and (not isinstance(call["value"], dict)
                                            or call["value"].get("tag") != call["tag"]):
            failures.append("a result for another call: {}".format(call))
    wire = [problem for caller in callers for problem in wire_problems(caller)]
    duplicated = [p for p in wire if p[0] == "duplicated"]
    misrouted = [p for p in wire if p[0] == "misrouted"]
    for kind, tag, header in wire:
        if "again" in header:
            header = dict(header, first_received=_relative(header.pop("first_received"), chaos),
                          again=_relative(header.pop("again"), chaos))
        failures.append("{} on the wire: tag {}: {}".format(kind, tag, header))

    twice = {tag: events for tag, events in runs.items()
             if sum(1 for event in events if event[0] == "start") > 1}
    failures += ["tag {} ran more than once: {}".format(tag, events)
                 for tag, events in twice.items()]
    kills_of = collections.defaultdict(list)
    for when, name, pid in chaos.daemon_kills:
        kills_of[pid].append(when)

    finished = {tag: next(e for e in events if e[0] == "finish")
                for tag, events in runs.items() if any(e[0] == "finish" for e in events)
                and tag in by_tag}
    delivered, excused, lost, during_broker_down = [], [], [], []
    for tag, (_, when, pid) in sorted(finished.items()):
        call = by_tag[tag]
        down = chaos.broker_was_down(when, when)
        if down:
            during_broker_down.append(tag)
        if call["outcome"] == "result":
            delivered.append(tag)
            continue
        killed = [kill for kill in kills_of.get(pid, []) if kill >= when]
        # The reply can leave its daemon once the run finished and a broker is up.
        leaves = chaos.broker_back_after(when)
        if killed and killed[0] <= leaves + HANDOFF_S:
            excused.append(tag)
        else:
            lost.append(tag)
            failures.append("tag {} finished in pid {} at {} ({}) but its caller got {}: "
                            "{}".format(tag, pid, _relative(when, chaos),
                                        "the broker was down" if down else
                                        "daemon killed at {}".format(killed) if killed else
                                        "its daemon lived on", call["outcome"],
                                        call.get("error")))
    results_without_run = [call["tag"] for call in calls
                           if call["outcome"] == "result" and call["tag"] not in finished]
    failures += ["a result for tag {} that no run log shows finished".format(tag)
                 for tag in results_without_run]
    down_undelivered = [tag for tag in during_broker_down if tag not in delivered
                        and tag not in excused]
    failures += ["tag {} finished while only the broker was down and was not delivered"
                 .format(tag) for tag in down_undelivered]

    report = "\n".join([
        "  calls: {} by {} clients; outcomes: {}".format(
            len(calls), len(callers), ", ".join("{} {}".format(k, v)
                                                for k, v in outcomes.most_common())),
        "  kills: {} daemons ({}), broker once (down {:.2f}s)".format(
            len(chaos.daemon_kills), ", ".join("{}:{}".format(name, pid)
                                               for _, name, pid in chaos.daemon_kills),
            (chaos.broker_down[0][1] or float("nan")) - chaos.broker_down[0][0]
            if chaos.broker_down else float("nan")),
        "  runs: {} started, {} finished; delivered {}; finished but the daemon was killed "
        "before its reply left (excused) {}; lost {}".format(
            sum(1 for events in runs.values() if any(e[0] == "start" for e in events)),
            len(finished), len(delivered), len(excused), len(lost)),
        "  finished while the broker was down: {} (delivered {}, excused {})".format(
            len(during_broker_down), sum(1 for t in during_broker_down if t in delivered),
            sum(1 for t in during_broker_down if t in excused)),
        "  duplicated terminal replies on the wire: {}; misrouted results: {}; tags run "
        "twice: {}".format(len(duplicated), len(misrouted), len(twice)),
    ])
    return report, failures
