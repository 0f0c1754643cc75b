"""What modelhost's memory manager buys over the habits it replaces, on one mixed trace.

    python3 bench/scheduling.py [--quick] [--json FILE] [--policies a,b,c] [--keep]

Three daemons hold real memory (bench/engines/stage_engine.py: touched numpy
arrays, with sleeps standing in for reading weights from disk and for moving
them to and from host RAM) under a memory threshold that fits any two of them
with their peaks and not all three. One trace (an interactive chat stream of
TTS calls, a batch of text-to-audio jobs, a few video jobs) is replayed from a
common start against a fresh `modelhost up` per policy:

  (a) global lock    CLIENT-SIDE EMULATION of one model at a time: a FIFO lock
                     around load, call, unload of every call;
  (b) LRU by count   CLIENT-SIDE EMULATION of a cache of at most 2 models,
                     whatever their size: load on a miss, unload the least
                     recently used idle one first;
  (c) modelhost      the broker's own policy: the real threshold, preload,
                     request priorities, no client-side control at all.

In (a) and (b) the broker's threshold is set far out of reach (it never
evicts) and no daemon preloads. Measured per policy: makespan, interactive
latency p50/p95, loads (and offloads/onloads), and the daemons' summed RSS
sampled from outside every 20 ms against the threshold.

Everything compared is measured in one run; nothing here asserts: the bench
prints which targets were met and exits 0.
"""

import argparse
import collections
import json
import os
import platform
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy
import psutil
import zmq

import modelhost

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UpHost, percentile  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = HERE / "engines"

MiB = 2**20
THRESHOLD_MIB = 780  # the real figure, used by (c) and counted against in every policy
UNREACHABLE = "100GiB"  # the broker's threshold in (a) and (b): it never intervenes
OFFLOAD_S = 0.3
ONLOAD_S = 0.3
READY_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 600.0
SAMPLE_S = 0.02
PS_EVERY_S = 0.2

# The stages. resident_mib: weights the engine touches on load (a daemon process
# holds ~40 MiB more before it loads anything: numpy, pyzmq, the runtime).
# Declared footprints include that baseline; the broker replaces them with what
# it measures. Any two fit with their peaks; all three do not (checked in the
# output against the baseline measured in the run).
STAGES = collections.OrderedDict([
    ("tts", {"what": "chat TTS", "resident_mib": 160, "load_s": 1.0, "call_s": 0.05,
             "peak_mib": 0, "priority": "interactive", "declared": "{resident: 200MiB, "
             "peak: 10MiB}"}),
    ("sfx", {"what": "text-to-audio", "resident_mib": 250, "load_s": 2.5, "call_s": 0.8,
             "peak_mib": 30, "priority": "batch", "declared": "{resident: 290MiB, peak: 40MiB}"}),
    ("video", {"what": "video", "resident_mib": 300, "load_s": 3.0, "call_s": 2.5,
               "peak_mib": 40, "priority": "normal", "declared": "{resident: 340MiB, "
               "peak: 50MiB}"}),
])

# (full run, --quick)
TRACES = {
    False: {"chat_period_s": 0.6, "chat_calls": 60, "batch_jobs": 10, "batch_workers": 2,
            "video_at_s": (2.0, 10.0, 20.0)},
    True: {"chat_period_s": 0.6, "chat_calls": 16, "batch_jobs": 4, "batch_workers": 2,
           "video_at_s": (2.0, 6.0)},
}

POLICIES = collections.OrderedDict([
    ("a", "(a) global lock, load/unload per call [client-side emulation]"),
    ("b", "(b) LRU by count, at most 2 resident [client-side emulation]"),
    ("c", "(c) modelhost: threshold, preload, priorities"),
])
SHORT = {"a": "(a) global lock [emul.]", "b": "(b) LRU-2 by count [emul.]", "c": "(c) modelhost"}


def log(line):
    print(line, file=sys.stderr, flush=True)


# --- a real `modelhost up` ---------------------------------------------------------

def stage_yaml(name, stage, preload, events):
    options = {"name": name, "resident_mib": stage["resident_mib"], "load_s": stage["load_s"],
               "offload_s": OFFLOAD_S, "onload_s": ONLOAD_S, "events": str(events)}
    lines = ["  {}:".format(name),
             "    engine: stage_engine:StageEngine",
             "    python: {}".format(json.dumps(sys.executable)),
             "    venv: false",
             "    pythonpath: [{}]".format(json.dumps(str(ENGINES))),
             "    concurrency: 1",
             "    max_queue: 64",
             "    preload: {}".format("true" if preload else "false"),
             "    memory: {}".format(stage["declared"]),
             "    options: {{{}}}".format(", ".join(
                 "{}: {}".format(k, json.dumps(v)) for k, v in options.items()))]
    if stage["priority"] == "interactive":
        # The chat loop's TTS: only interactive work may evict it, from the start.
        lines.append("    priority: interactive")
    return "\n".join(lines) + "\n"


class Host(UpHost):
    def __init__(self, directory, threshold, preload):
        directory = Path(directory)
        self.events = directory / "events.jsonl"
        super().__init__(
            directory,
            ["memory: {{probe: host, threshold: {}, external: ignore, sample_s: 0.05}}".format(
                threshold)],
            [stage_yaml(name, stage, preload, self.events) for name, stage in STAGES.items()])

    def wait_settled(self, client, timeout=READY_TIMEOUT_S, settle_s=1.0):
        """The ps rows once every daemon is up, no move is under way, for settle_s in a row."""
        deadline = time.monotonic() + timeout
        calm_since, last = None, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("modelhost up exited with {}:\n{}".format(
                    self.process.returncode, self.log_tail()))
            try:
                last = client.ps(timeout=2.0)
            except modelhost.ModelhostError as exc:
                last, calm_since = exc, None
                time.sleep(0.2)
                continue
            rows = {row["name"]: row for row in last["daemons"]}
            for row in rows.values():
                if row["state"] == "failed":
                    raise RuntimeError("daemon {} failed: {}\n{}".format(
                        row["name"], row.get("last_error"), self.log_tail()))
            calm = set(rows) == set(STAGES) and all(
                row["pid"] and row["target"] is None
                and row["state"] in ("ready", "unloaded", "offloaded") for row in rows.values())
            if not calm:
                calm_since = None
            elif calm_since is None:
                calm_since = time.monotonic()
            elif time.monotonic() - calm_since >= settle_s:
                return last
            time.sleep(0.1)
        raise RuntimeError("daemons not settled after {:.0f}s; last status: {}\n{}".format(
            timeout, last, self.log_tail()))


# --- sampling memory from outside the broker ----------------------------------------------

class Sampler(threading.Thread):
    """The daemons' summed RSS every SAMPLE_S, pids learned from `ps` every PS_EVERY_S."""

    def __init__(self, endpoint, threshold_bytes):
        super(Sampler, self).__init__(daemon=True)
        self.endpoint = endpoint
        self.threshold = threshold_bytes
        self.window = None  # (start, end) monotonic: only samples inside count
        self.samples = []  # (monotonic, bytes)
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        processes = {}
        last_ps = 0.0
        try:
            with modelhost.Client(self.endpoint) as client:
                while not self.stopping.is_set():
                    now = time.monotonic()
                    if now - last_ps >= PS_EVERY_S:
                        try:
                            pids = {row["pid"] for row in client.ps(timeout=2.0)["daemons"]
                                    if row["pid"]}
                            processes = {pid: processes.get(pid) or psutil.Process(pid)
                                         for pid in pids if _exists(pid)}
                        except modelhost.ModelhostError:
                            pass
                        last_ps = now
                    total = 0
                    for process in list(processes.values()):
                        try:
                            total += process.memory_info().rss
                        except psutil.Error:
                            continue
                    self.samples.append((time.monotonic(), total))
                    self.stopping.wait(SAMPLE_S)
        except Exception as exc:  # reported, not raised: the bench goes on
            self.error = repr(exc)

    def stop(self):
        self.stopping.set()
        self.join(10)

    def summary(self, start, end):
        inside = [b for t, b in self.samples if start <= t <= end]
        over = [b for b in inside if b > self.threshold]
        return {"samples": len(inside), "over": len(over),
                "peak_mib": max(inside) / MiB if inside else float("nan"),
                "error": self.error}


def _exists(pid):
    try:
        psutil.Process(pid)
        return True
    except psutil.Error:
        return False


# --- the policies' client-side parts ------------------------------------------------------

class FifoLock(object):
    """A ticket lock: holders in the order they asked (threading.Lock promises no order)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                self._cond.wait()

    def __exit__(self, *exc_info):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class LruByCount(object):
    """(b): at most `slots` models resident, whatever their size, least recently used out.

    Before a call to M: if M is resident, use it. Otherwise, with `slots` models
    resident (or being loaded), unload the least recently used one that has no
    call in flight from any bench thread, then load M. When every resident
    model has calls in flight, wait for one to finish: unloading a model with
    calls queued at the broker would only have the broker load it again for
    them. Loads and unloads run outside the controller's lock, so calls to
    resident models never wait behind another model's load.
    """

    def __init__(self, slots=2):
        self.slots = slots
        self._cond = threading.Condition()
        self._resident = collections.OrderedDict()  # least recently used first
        self._uses = collections.Counter()
        self._pending = set()  # being loaded

    def acquire(self, client, name):
        victim = None
        with self._cond:
            while True:
                if name in self._resident:
                    self._uses[name] += 1
                    self._resident.move_to_end(name)
                    return
                if name in self._pending:
                    self._cond.wait()
                    continue
                if len(self._resident) + len(self._pending) >= self.slots:
                    idle = [n for n in self._resident if self._uses[n] == 0]
                    if not idle:
                        self._cond.wait()
                        continue
                    victim = idle[0]
                    del self._resident[victim]
                self._pending.add(name)
                break
        try:
            if victim is not None:
                client.unload(victim, timeout=CALL_TIMEOUT_S)
            client.load(name, timeout=CALL_TIMEOUT_S)
        except BaseException:
            with self._cond:
                self._pending.discard(name)
                self._cond.notify_all()
            raise
        with self._cond:
            self._pending.discard(name)
            self._resident[name] = True
            self._uses[name] += 1
            self._cond.notify_all()

    def release(self, name):
        with self._cond:
            self._uses[name] -= 1
            if name in self._resident:
                self._resident.move_to_end(name)
            self._cond.notify_all()


def make_runner(policy):
    """fn(client, model, seconds, peak_mib, priority) -> result, doing what `policy` does."""
    if policy == "a":
        lock = FifoLock()

        def run(client, model, seconds, peak_mib, priority):
            with lock:
                client.load(model, timeout=CALL_TIMEOUT_S)
                try:
                    return client.call(model, "run", seconds=seconds, peak_mib=peak_mib,
                                       priority=priority, timeout=CALL_TIMEOUT_S)
                finally:
                    client.unload(model, timeout=CALL_TIMEOUT_S)
        return run
    if policy == "b":
        lru = LruByCount(2)

        def run(client, model, seconds, peak_mib, priority):
            lru.acquire(client, model)
            try:
                return client.call(model, "run", seconds=seconds, peak_mib=peak_mib,
                                   priority=priority, timeout=CALL_TIMEOUT_S)
            finally:
                lru.release(model)
        return run

    def run(client, model, seconds, peak_mib, priority):
        return client.call(model, "run", seconds=seconds, peak_mib=peak_mib,
                           priority=priority, timeout=CALL_TIMEOUT_S)
    return run


# --- the trace ------------------------------------------------------------------------------

def replay(endpoint, policy, trace):
    """Run the trace from a common start; [{kind, submit, done, error}] in seconds from it."""
    runner = make_runner(policy)
    records, lock = [], threading.Lock()
    threads = []
    start_at = [None]
    ready = threading.Barrier(1 + 1 + trace["batch_workers"] + len(trace["video_at_s"]))

    def job(client, kind, model):
        stage = STAGES[model]
        submit = time.monotonic()
        error = None
        try:
            runner(client, model, stage["call_s"], stage["peak_mib"], stage["priority"])
        except modelhost.ModelhostError as exc:
            error = "{}: {}".format(type(exc).__name__, exc)
        done = time.monotonic()
        with lock:
            records.append({"kind": kind, "model": model, "submit": submit - start_at[0],
                            "done": done - start_at[0], "error": error})

    def sleep_until(offset):
        left = start_at[0] + offset - time.monotonic()
        if left > 0:
            time.sleep(left)

    def chat():
        with modelhost.Client(endpoint) as client:
            ready.wait()
            for index in range(trace["chat_calls"]):
                # Closed loop, like a conversation: the next line at its time, or
                # when the previous answer came, whichever is later.
                sleep_until(index * trace["chat_period_s"])
                job(client, "interactive", "tts")

    jobs = queue.Queue()
    for _ in range(trace["batch_jobs"]):
        jobs.put("sfx")  # all submitted at t=0

    def batch_worker():
        with modelhost.Client(endpoint) as client:
            ready.wait()
            while True:
                try:
                    model = jobs.get_nowait()
                except queue.Empty:
                    return
                job(client, "batch", model)

    def video(at):
        with modelhost.Client(endpoint) as client:
            ready.wait()
            sleep_until(at)
            job(client, "normal", "video")

    threads.append(threading.Thread(target=chat, name="chat"))
    threads += [threading.Thread(target=batch_worker, name="batch%d" % i)
                for i in range(trace["batch_workers"])]
    threads += [threading.Thread(target=video, args=(at,), name="video@%g" % at)
                for at in trace["video_at_s"]]
    for thread in threads:
        thread.daemon = True
        thread.start()
    start_at[0] = time.monotonic() + 0.3
    ready.wait()  # every client is connected; the trace starts at start_at
    for thread in threads:
        thread.join()
    return start_at[0], records


# --- one policy -------------------------------------------------------------------------------

def read_events(path, start_wall, end_wall):
    """Tier moves from the engines' event log: before, during and after the trace."""
    counts = {"before": collections.Counter(), "during": collections.Counter(),
              "after": collections.Counter()}
    per_daemon = collections.defaultdict(collections.Counter)
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        # The end is the last reply: a move still under way then has not
        # logged yet, and the unloads of the shutdown come after it.
        when = ("before" if event["at"] < start_wall else
                "during" if event["at"] <= end_wall + 0.05 else "after")
        counts[when][event["event"]] += 1
        if when == "during":
            per_daemon[event["daemon"]][event["event"]] += 1
    return {"before": dict(counts["before"]), "during": dict(counts["during"]),
            "after": dict(counts["after"]),
            "per_daemon": {k: dict(v) for k, v in per_daemon.items()}}


def run_policy(policy, directory, trace):
    real = "{}MiB".format(THRESHOLD_MIB)
    host = Host(directory, real if policy == "c" else UNREACHABLE, preload=policy == "c")
    sampler = None
    host.start()
    try:
        with modelhost.Client(host.endpoint) as client:
            settled = host.wait_settled(client)
            ready_s = time.monotonic() - host.started_at
            tiers_at_start = {row["name"]: row["tier"] for row in settled["daemons"]}
            baseline = {row["name"]: psutil.Process(row["pid"]).memory_info().rss / MiB
                        for row in settled["daemons"] if row["tier"] == "unloaded"}
            log("  {}: up and settled after {:.1f}s; tiers {}".format(
                SHORT[policy], ready_s, tiers_at_start))
            sampler = Sampler(host.endpoint, THRESHOLD_MIB * MiB)
            sampler.start()
            time.sleep(0.3)  # its first ps
            wall_offset = time.time() - time.monotonic()
            start, records = replay(host.endpoint, policy, trace)
            end = start + max(r["done"] for r in records)
            sampler.stop()
            status = client.ps(timeout=5.0)
    finally:
        if sampler is not None:
            sampler.stop()
        host.stop()
    events = read_events(host.events, start + wall_offset, end + wall_offset)
    memory = sampler.summary(start, end)
    chat = sorted(r["done"] - r["submit"] for r in records
                  if r["kind"] == "interactive" and r["error"] is None)
    rows = {row["name"]: row for row in status["daemons"]}
    result = {
        "policy": policy, "label": POLICIES[policy],
        "ready_s": ready_s, "tiers_at_start": tiers_at_start, "baseline_mib": baseline,
        "makespan_s": end - start,
        "chat_calls": len(chat),
        "chat_p50_ms": percentile(chat, 0.50) * 1e3,
        "chat_p95_ms": percentile(chat, 0.95) * 1e3,
        "chat_max_ms": (chat[-1] if chat else float("nan")) * 1e3,
        "done_s": {kind: max((r["done"] for r in records if r["kind"] == kind), default=None)
                   for kind in ("interactive", "batch", "normal")},
        "errors": [r for r in records if r["error"] is not None],
        "calls": len(records),
        "ps_loads": sum(row["loads"] for row in rows.values()),
        "ps_evictions": sum(row["evictions"] for row in rows.values()),
        "ps_rows": {name: {k: row.get(k) for k in ("tier", "loads", "evictions", "restarts",
                                                    "footprint")}
                    for name, row in rows.items()},
        "moves": events,
        "memory": memory,
    }
    return result


# --- output -----------------------------------------------------------------------------------

def fit_check(baseline_mib):
    """Lines that check the threshold against the stages and the measured baseline."""
    base = baseline_mib if baseline_mib else 40.0
    n = len(STAGES)
    two = []
    names = list(STAGES)
    for i in range(n):
        for j in range(i + 1, n):
            s, t = STAGES[names[i]], STAGES[names[j]]
            two.append(n * base + s["resident_mib"] + t["resident_mib"] + s["peak_mib"]
                       + t["peak_mib"])
    three = n * base + sum(s["resident_mib"] for s in STAGES.values())
    return {"baseline_mib": base, "two_worst_mib": max(two), "three_mib": three,
            "two_fit": max(two) <= THRESHOLD_MIB, "three_do_not": three > THRESHOLD_MIB}


def format_table(results):
    header = "{:<28} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>6} {:>10} {:>7}".format(
        "policy", "makespan", "chat p50", "chat p95", "loads", "onloads", "peak", "over",
        "samples", "errors")
    units = "{:<28} {:>9} {:>9} {:>9} {:>6} {:>8} {:>9} {:>6} {:>10} {:>7}".format(
        "", "s", "ms", "ms", "(ps)", "", "MiB", "", "", "")
    lines = [header, units]
    for r in results:
        m = r["memory"]
        lines.append("{:<28} {:>9.1f} {:>9.0f} {:>9.0f} {:>6} {:>8} {:>9.0f} {:>6} {:>10} {:>7}"
                     .format(SHORT[r["policy"]], r["makespan_s"], r["chat_p50_ms"],
                             r["chat_p95_ms"], r["ps_loads"],
                             r["moves"]["during"].get("onload", 0), m["peak_mib"], m["over"],
                             m["samples"], len(r["errors"])))
    return "\n".join(lines)


def format_details(r):
    during, before = r["moves"]["during"], r["moves"]["before"]

    def moves(counts):
        return ", ".join("{} {}".format(counts.get(k, 0), k + "s")
                         for k in ("load", "unload", "offload", "onload"))

    done = r["done_s"]
    lines = ["{}:".format(r["label"]),
             "  up and settled in {:.1f}s, tiers at the start: {}".format(
                 r["ready_s"], ", ".join("{} {}".format(k, v)
                                         for k, v in r["tiers_at_start"].items())),
             "  moves before the trace: {}; during it: {}; broker evictions: {}".format(
                 moves(before), moves(during), r["ps_evictions"]),
             "  last reply: chat {}, batch {}, video {} (s from the start); chat max {:.0f} ms, "
             "{} chat calls".format(*["-" if done[k] is None else "{:.1f}".format(done[k])
                                      for k in ("interactive", "batch", "normal")],
                                    r["chat_max_ms"], r["chat_calls"])]
    per = r["moves"]["per_daemon"]
    if per:
        lines.append("  per daemon during the trace: " + "; ".join(
            "{} {}".format(name, " ".join("{} {}".format(k, per[name][k])
                                          for k in ("load", "unload", "offload", "onload")
                                          if per[name].get(k)))
            for name in STAGES if name in per))
    if r["memory"]["error"]:
        lines.append("  sampler error: {}".format(r["memory"]["error"]))
    for error in r["errors"][:5]:
        lines.append("  error at {:.1f}s ({} {}): {}".format(error["done"], error["kind"],
                                                            error["model"], error["error"]))
    return "\n".join(lines)


def ratios(by_policy):
    found = []

    def add(name, value, target, met):
        found.append({"name": name, "value": value, "target": target, "met": met})

    c = by_policy.get("c")
    if c is not None:
        over = c["memory"]["over"]
        add("threshold violations (c)", over, "== 0", over == 0 and c["memory"]["samples"] > 0)
    if "a" in by_policy and c is not None:
        value = by_policy["a"]["chat_p95_ms"] / c["chat_p95_ms"]
        add("interactive p95 (a)/(c)", value, ">= 5x", value >= 5.0)
    if "b" in by_policy and c is not None:
        value = c["makespan_s"] / by_policy["b"]["makespan_s"]
        add("makespan (c)/(b)", value, "<= 1.0", value <= 1.0)
    if "b" in by_policy and c is not None:
        add("interactive p95 (b)/(c)", by_policy["b"]["chat_p95_ms"] / c["chat_p95_ms"],
            None, None)
    if "a" in by_policy and c is not None:
        add("makespan (a)/(c)", by_policy["a"]["makespan_s"] / c["makespan_s"], None, None)
    for key in ("a", "b"):
        if key in by_policy and c is not None and c["ps_loads"]:
            add("loads {}/(c)".format("(" + key + ")"),
                by_policy[key]["ps_loads"] / c["ps_loads"], None, None)
    return found


def format_ratio(ratio):
    value = ratio["value"]
    text = "{} = {}".format(ratio["name"], value if isinstance(value, int)
                            else "{:.2f}x".format(value))
    if ratio["target"] is not None:
        text += " (target {}: {})".format(ratio["target"], "met" if ratio["met"] else "NOT met")
    return text


# --- main -------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter trace: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (configs, `modelhost up` logs, move events)")
    parser.add_argument("--policies", default="a,b,c",
                        help="which to run, comma-separated (default a,b,c)")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown or not chosen:
        parser.error("--policies takes a comma-separated subset of a,b,c")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    trace = TRACES[args.quick]
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
              "versions": {"python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
                           "numpy": numpy.__version__, "psutil": psutil.__version__,
                           "modelhost": modelhost.__version__},
              "threshold_mib": THRESHOLD_MIB, "stages": STAGES, "trace": trace,
              "offload_s": OFFLOAD_S, "onload_s": ONLOAD_S, "results": []}
    directory = Path(tempfile.mkdtemp(prefix="mhs-", dir="/tmp"))
    try:
        for policy in (p for p in POLICIES if p in chosen):
            log("{} ...".format(POLICIES[policy]))
            t0 = time.monotonic()
            result = run_policy(policy, directory / policy, trace)
            report["results"].append(result)
            log("  done in {:.0f}s: makespan {:.1f}s, chat p95 {:.0f} ms, {} loads".format(
                time.monotonic() - t0, result["makespan_s"], result["chat_p95_ms"],
                result["ps_loads"]))
    finally:
        if args.keep:
            log("kept {} (per policy: config.yaml, up.log, events.jsonl)".format(directory))
        else:
            shutil.rmtree(str(directory), ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    results = report["results"]
    by_policy = {r["policy"]: r for r in results}
    baselines = [v for r in results for v in r["baseline_mib"].values()]
    report["fit"] = fit_check(sum(baselines) / len(baselines) if baselines else None)
    report["ratios"] = ratios(by_policy)

    v = report["versions"]
    print("modelhost scheduling bench{} - {}".format(" (--quick)" if args.quick else "",
                                                     report["started"]))
    print("python {python}, pyzmq {pyzmq}, numpy {numpy}, psutil {psutil}".format(**v))
    print("cpus {}, load average at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
          .format(report["cpus"], *(report["loadavg_start"] + report["loadavg_end"])))
    print("")
    print("daemons (stand-ins; bench/engines/stage_engine.py): weights touched on load, load "
          "time standing in for reading them from disk, offload/onload {}/{}s".format(
              OFFLOAD_S, ONLOAD_S))
    for name, s in STAGES.items():
        print("  {:<6} {:<14} {:>4} MiB, load {:.1f}s, call {:.2f}s +{} MiB at its peak, "
              "priority {}".format(name, s["what"], s["resident_mib"], s["load_s"], s["call_s"],
                                   s["peak_mib"], s["priority"]))
    fit = report["fit"]
    print("threshold {} MiB of summed daemon RSS; with {:.0f} MiB per idle process measured: "
          "the worst two with their peaks {:.0f} MiB ({}), all three {:.0f} MiB ({})".format(
              THRESHOLD_MIB, fit["baseline_mib"], fit["two_worst_mib"],
              "fit" if fit["two_fit"] else "DO NOT fit", fit["three_mib"],
              "do not fit" if fit["three_do_not"] else "FIT: the bench tests nothing"))
    print("trace: a chat stream of {} TTS calls, one every {}s (next at its time or at the "
          "previous reply; interactive); {} text-to-audio jobs at t=0 on {} workers (batch); "
          "video jobs at t={} s (normal)".format(
              trace["chat_calls"], trace["chat_period_s"], trace["batch_jobs"],
              trace["batch_workers"], ", ".join("%g" % t for t in trace["video_at_s"])))
    print("")
    print(format_table(results))
    print("makespan: trace start to last reply; chat: submit to reply; loads: sum of `loads` in "
          "ps at the end (preloads included); onloads: during the trace; peak, over: "
          "summed daemon RSS sampled every {:.0f} ms, samples over {} MiB".format(
              SAMPLE_S * 1e3, THRESHOLD_MIB))
    print("")
    for r in results:
        print(format_details(r))
    print("")
    print("ratios:")
    for ratio in report["ratios"]:
        print("  " + format_ratio(ratio))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
