"""What modelhost costs per call, measured against raw ZeroMQ and against `python model.py`.

    python3 bench/overhead.py [--quick] [--skip-torch] [--json FILE]

Part 1: round-trip latency (p50, p99) and sequential throughput for payloads
of 0 B, 1 MiB, 16 MiB and 256 MiB over ipc:// between separate processes, on seven
paths:
  direct             client DEALER <-> echo process ROUTER (raw pyzmq, copy=False);
  proxy              client DEALER -> zmq.proxy(ROUTER, DEALER) process -> echo worker;
  python forwarder   the same hop done by a do-nothing pyzmq loop (poll, recv, send,
                     copy=False): the floor of any broker written in Python;
  python fwd+msgpack the same loop, which also unpacks and re-packs a small msgpack
                     header frame per message, as a broker must;
  modelhost bytes    Client.call("echo", "echo", data=<bytes>) through a real
                     `modelhost up` (supervisor, broker, daemon);
  modelhost ndarray  the same with a numpy uint8 array (zero-copy on receipt); from
                     1 MiB (broker.shm.threshold) in shared memory both ways;
  ndarray frames     the same array through a second `modelhost up` with shared
                     memory off (broker.shm.threshold: off): every byte in frames.
The paths are interleaved in rounds so that drift on a noisy machine hits
each alike. Received payloads of 1 MiB and more are read (a byte per page) on
every path, so a mapping that was never touched is not taken for a transfer.

Part 2: a subprocess per call (import torch, load ~0.5 GB of weights, one
small forward) against the same forward in a warm daemon behind the same broker.

Everything compared is measured in one run; nothing here asserts on timings.
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy
import psutil
import zmq

import modelhost

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UpHost, die_with_parent, percentile  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = HERE / "engines"

MiB = 2**20
SIZES = (("0 B", 0), ("1 MiB", MiB), ("16 MiB", 16 * MiB), ("256 MiB", 256 * MiB))
# (full run, --quick) calls per path and payload size.
ITERATIONS = {0: (2000, 200), MiB: (200, 30), 16 * MiB: (40, 10), 256 * MiB: (15, 4)}
PATHS = ("direct", "proxy", "python forwarder", "python fwd+msgpack", "modelhost bytes",
         "modelhost ndarray", "ndarray frames")
# The header the msgpack forwarder's caller sends ahead of its payload: a call's size.
FORWARDED_HEADER = msgpack.packb({"op": "call", "id": 1, "model": "echo", "method": "echo",
                                  "priority": "normal", "stream": False, "v": 1})
RAW_PATHS = PATHS[:4]  # raw pyzmq, their echo a zmq.Frame
TOUCH_FROM = MiB  # received payloads this big are read, a byte per page

READY_TIMEOUT_S = 180.0
REPLY_TIMEOUT_MS = 30000


# --- helper processes (this same file, run with --role) -------------------------------

def _echo_loop(socket):
    while True:
        frames = socket.recv_multipart(copy=False)
        socket.send_multipart(frames, copy=False)


def _forward(frontend, backend, repack):
    """What zmq.proxy does, in Python: the least a Python broker's loop does per message.

    Both directions carry [routing id, frames...]; `repack` also decodes and
    re-encodes frame 1, a msgpack header, as a broker that reads headers must.
    """
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        for socket, _ in poller.poll():
            frames = socket.recv_multipart(copy=False)
            if repack:
                frames[1] = msgpack.packb(msgpack.unpackb(frames[1].bytes))
            (backend if socket is frontend else frontend).send_multipart(frames, copy=False)


def run_role(role, endpoints):
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    context = zmq.Context()
    if role == "echo":
        # (a) the far end of the direct path: ROUTER, echoes [identity, payload].
        socket = context.socket(zmq.ROUTER)
        socket.bind(endpoints[0])
        _echo_loop(socket)
    elif role == "proxy":
        # (b) the C-level hop: libzmq moves the frames, no Python per message.
        frontend = context.socket(zmq.ROUTER)
        frontend.bind(endpoints[0])
        backend = context.socket(zmq.DEALER)
        backend.bind(endpoints[1])
        zmq.proxy(frontend, backend)
    elif role in ("forwarder", "forwarder-msgpack"):
        frontend = context.socket(zmq.ROUTER)
        frontend.bind(endpoints[0])
        backend = context.socket(zmq.DEALER)
        backend.bind(endpoints[1])
        _forward(frontend, backend, role == "forwarder-msgpack")
    elif role == "worker":
        # (b) behind the proxy: DEALER, echoes [identity, payload] back through it.
        socket = context.socket(zmq.DEALER)
        socket.connect(endpoints[0])
        _echo_loop(socket)
    else:
        raise SystemExit("unknown role {!r}".format(role))


def start_helper(role, *endpoints):
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--role", role]
                            + list(endpoints), stdin=subprocess.DEVNULL)


def stop_process(process, timeout=5.0):
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- a real `modelhost up` ---------------------------------------------------------

def daemon_yaml(name, engine, options=None, **settings):
    lines = ["  {}:".format(name),
             "    engine: {}".format(engine),
             "    python: {}".format(json.dumps(sys.executable)),
             "    venv: false",
             "    pythonpath: [{}]".format(json.dumps(str(ENGINES)))]
    for key, value in settings.items():
        lines.append("    {}: {}".format(key, value))
    if options:
        lines.append("    options:")
        lines += ["      {}: {}".format(key, json.dumps(value)) for key, value in options.items()]
    return "\n".join(lines) + "\n"


class Host(UpHost):
    def __init__(self, directory, daemons, extra=()):
        super().__init__(directory, ["max_payload: 512MiB", "max_reply: 512MiB"] + list(extra),
                         daemons)

    def wait_ready(self, names, timeout=READY_TIMEOUT_S):
        """{name: seconds from `modelhost up` to ready} once every daemon in names is ready."""
        ready_after = {}
        deadline = time.monotonic() + timeout
        last = None
        with modelhost.Client(self.endpoint) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError("modelhost up exited with {}:\n{}".format(
                        self.process.returncode, self.log_tail()))
                try:
                    last = client.ps(timeout=2.0)
                except modelhost.ModelhostError as exc:
                    last = exc
                    client.close()
                    client = modelhost.Client(self.endpoint)
                    continue
                for row in last["daemons"]:
                    if row["name"] in names and row["state"] in ("ready", "busy"):
                        ready_after.setdefault(row["name"], time.monotonic() - self.started_at)
                    elif row["name"] in names and row["state"] == "failed":
                        raise RuntimeError("daemon {} failed: {}\n{}".format(
                            row["name"], row.get("last_error") or row, self.log_tail()))
                if all(name in ready_after for name in names):
                    return ready_after
                time.sleep(0.05)
        raise RuntimeError("daemons {} not ready after {:.0f}s; last status: {}\n{}".format(
            ", ".join(names), timeout, last, self.log_tail()))


# --- statistics ------------------------------------------------------------------

def summarize(latencies_s):
    ordered = sorted(latencies_s)
    total = sum(ordered)
    return {"calls": len(ordered),
            "p50_ms": percentile(ordered, 0.50) * 1e3,
            "p99_ms": percentile(ordered, 0.99) * 1e3,
            "mean_ms": total / len(ordered) * 1e3,
            "calls_per_s": len(ordered) / total if total else float("inf")}


# --- Part 1 ------------------------------------------------------------------------

def raw_caller(socket):
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)

    def call(payload):
        socket.send(payload, copy=False)
        if not poller.poll(REPLY_TIMEOUT_MS):
            raise RuntimeError("no echo within {}s".format(REPLY_TIMEOUT_MS / 1000))
        return socket.recv(copy=False)

    return call


def header_caller(socket):
    """raw_caller for the msgpack forwarder: a header frame ahead of the payload."""
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)

    def call(payload):
        socket.send(FORWARDED_HEADER, zmq.SNDMORE)
        socket.send(payload, copy=False)
        if not poller.poll(REPLY_TIMEOUT_MS):
            raise RuntimeError("no echo within {}s".format(REPLY_TIMEOUT_MS / 1000))
        return socket.recv_multipart(copy=False)[-1]

    return call


def modelhost_caller(client):
    def call(payload):
        return client.call("echo", "echo", data=payload)

    return call


def touch(received):
    """Read one byte of every page of what a call returned (the bytes are the point)."""
    data = received if isinstance(received, (bytes, numpy.ndarray)) else received.buffer
    if len(data) >= TOUCH_FROM:
        numpy.frombuffer(data, dtype=numpy.uint8)[::4096].sum()


def check_echo(path, sent, received):
    if path not in RAW_PATHS:
        if isinstance(sent, numpy.ndarray):
            ok = isinstance(received, numpy.ndarray) and received.shape == sent.shape \
                and numpy.array_equal(received, sent)
        else:
            ok = received == sent
    else:
        ok = received.bytes == sent
    if not ok:
        raise RuntimeError("{}: the echo differs from what was sent".format(path))


def cpu_seconds(pid):
    """CPU time of all of a process's threads so far; None if unreadable.

    psutil lists the threads; each one's time on a CPU comes from its schedstat
    (nanoseconds), or where that is missing from psutil's cpu_times (user + system,
    clock ticks): a broker's share of a 256 MiB call is far below one tick.
    """
    try:
        process = psutil.Process(pid)
        threads = process.threads()
        try:
            total = 0
            for thread in threads:
                with open("/proc/{}/task/{}/schedstat".format(pid, thread.id)) as handle:
                    total += int(handle.read().split()[0])
            return total / 1e9
        except (OSError, ValueError, IndexError):
            times = process.cpu_times()
            return times.user + times.system
    except psutil.Error:
        return None


def part1(callers, processes, quick, rounds, log):
    """Rows of latency and throughput; `processes` maps path -> (middle pid, far pid)."""
    results = []
    rng = numpy.random.default_rng(0)
    for label, size in SIZES:
        # Random bytes, every page written: no zero-page shortcuts for any path.
        array = rng.integers(0, 256, size, dtype=numpy.uint8)
        payloads = {path: array.tobytes() for path in PATHS}
        payloads["modelhost ndarray"] = payloads["ndarray frames"] = array
        total = ITERATIONS[size][1 if quick else 0]
        per_round = max(1, total // rounds)
        warmup = max(3, per_round // 4)
        for path in PATHS:
            check_echo(path, payloads[path], callers[path](payloads[path]))
            for _ in range(warmup):
                callers[path](payloads[path])
        latencies = {path: [] for path in PATHS}
        # CPU seconds spent during each path's calls: client, middle, far end.
        cpu = {path: [0.0, 0.0, 0.0] for path in PATHS}
        started = time.monotonic()
        clock = time.perf_counter
        for round_index in range(rounds):
            # Rotate the order so that no path always runs first (or last) in a round.
            order = PATHS[round_index % len(PATHS):] + PATHS[:round_index % len(PATHS)]
            for path in order:
                call, payload, sink = callers[path], payloads[path], latencies[path]
                pids = (os.getpid(),) + processes[path]
                before = [cpu_seconds(pid) for pid in pids]
                for _ in range(per_round):
                    t0 = clock()
                    received = call(payload)
                    if size >= TOUCH_FROM:
                        touch(received)
                    sink.append(clock() - t0)
                    received = None
                after = [cpu_seconds(pid) for pid in pids]
                for index, (b, a) in enumerate(zip(before, after)):
                    if b is None or a is None or cpu[path][index] is None:
                        cpu[path][index] = None
                    elif pids[index] is not None:
                        cpu[path][index] += a - b
        log("  {}: {} rounds x {} calls per path in {:.1f}s".format(
            label, rounds, per_round, time.monotonic() - started))
        for path in PATHS:
            row = {"path": path, "payload": label, "payload_bytes": size}
            row.update(summarize(latencies[path]))
            calls = len(latencies[path])
            for key, seconds in zip(("cpu_client_ms", "cpu_middle_ms", "cpu_far_ms"), cpu[path]):
                row[key] = None if seconds is None else seconds / calls * 1e3
            results.append(row)
    return results


def part1_ratios(rows):
    p50 = {(r["path"], r["payload_bytes"]): r["p50_ms"] for r in rows}
    ratios = []

    def add(name, numerator, denominator, size, target=None):
        value = p50[(numerator, size)] / p50[(denominator, size)]
        ratios.append({"name": name, "value": value, "target_max": target,
                       "met": None if target is None else value <= target})

    for variant in ("modelhost bytes", "modelhost ndarray"):
        add("{} / proxy p50 @ 0 B".format(variant), variant, "proxy", 0, 1.5)
    for label, size in SIZES[2:]:
        for variant in ("modelhost ndarray", "modelhost bytes"):
            add("{} / direct p50 @ {}".format(variant, label), variant, "direct", size, 1.3)
        add("ndarray frames / direct p50 @ {}".format(label), "ndarray frames", "direct", size)
    for variant in ("python forwarder", "python fwd+msgpack"):
        add("{} / proxy p50 @ 0 B".format(variant), variant, "proxy", 0)
    add("modelhost bytes / python fwd+msgpack p50 @ 0 B", "modelhost bytes",
        "python fwd+msgpack", 0)
    for label, size in SIZES:
        add("proxy / direct p50 @ {}".format(label), "proxy", "direct", size)
    for label, size in SIZES[1:]:
        add("modelhost ndarray / proxy p50 @ {}".format(label), "modelhost ndarray", "proxy",
            size)
    return ratios


# (full run, --quick) pairs of calls per payload size in broker_same_length.
SAME_LENGTH_PAIRS = {0: (300, 50), MiB: (100, 20), 16 * MiB: (40, 8), 256 * MiB: (20, 3)}


def broker_same_length(call, client, pid, quick):
    """Per payload size: the broker's CPU ms per array call (`call`), and per echo `sleep`
    call as long with no payload, in pairs (one of each, interleaved).

    A broker also spends CPU per second while a call runs (the memory probe samples
    running calls every memory.sample_s; heartbeats, the supervisor's reports and the
    footprint store come every second), so a 256 MiB call, which lasts longer, costs
    it more than a 0 B one even where it never touches the bytes. A call that moves
    nothing and lasts as long costs it that too: what the array call costs beyond it
    is its payload's part.
    """
    rng = numpy.random.default_rng(1)
    found = {}
    empty_s = None  # how long a 0 B call lasts: a sleep call's messages take that too
    for label, size in SIZES:
        array = rng.integers(0, 256, size, dtype=numpy.uint8)
        spent, pairs = [0.0, 0.0], SAME_LENGTH_PAIRS[size][1 if quick else 0]
        took = []
        for _ in range(pairs):
            t0, before = time.perf_counter(), cpu_seconds(pid)
            received = call(array)
            if size >= TOUCH_FROM:
                touch(received)
            received = None
            middle, t1 = cpu_seconds(pid), time.perf_counter()
            client.call("echo", "sleep", seconds=max(0.0, t1 - t0 - (empty_s or 0.0)))
            after = cpu_seconds(pid)
            if None in (before, middle, after):
                return None
            spent[0] += middle - before
            spent[1] += after - middle
            took.append(t1 - t0)
        if empty_s is None:
            empty_s = sorted(took)[len(took) // 2]
        found[label] = (spent[0] / pairs * 1e3, spent[1] / pairs * 1e3)
    return found


def broker_cpu(same_length):
    """Per path and size: the broker's CPU ms per call, per payload-free call as long, and
    the difference (the payload's part); `same_length`: path -> broker_same_length's."""
    lines = []
    for path, found in same_length.items():
        if found:
            lines.append("{}: {}".format(path, ", ".join(
                "{} {:.3f} vs {:.3f} ({:+.3f})".format(label, ms, idle, ms - idle)
                for label, (ms, idle) in found.items())))
    return lines


# --- Part 2 ------------------------------------------------------------------------

BASELINE_CODE = (
    "import sys; sys.path.insert(0, {engines!r}); import torch_model; "
    "model = torch_model.load_model({path!r}); "
    "print(repr(torch_model.forward_once(model, {seed})))")


def build_state_dict(path):
    code = ("import sys; sys.path.insert(0, {!r}); import torch_model; "
            "print(torch_model.build_state_dict({!r}))").format(str(ENGINES), str(path))
    out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return int(out.strip().splitlines()[-1])


def baseline_call(path, seed):
    code = BASELINE_CODE.format(engines=str(ENGINES), path=str(path), seed=seed)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError("the baseline subprocess failed:\n" + done.stderr[-3000:])
    return elapsed, float(done.stdout.strip().splitlines()[-1])


def part2(client, state_path, quick, log):
    baseline_n, warm_n = (2, 20) if quick else (5, 200)
    for seed in range(5):  # warm-up, and a cross-check that both sides compute the same
        client.call("torch", "forward", seed=seed)
    baseline, warm = [], []
    per_round = warm_n // baseline_n
    seed = 0
    for round_index in range(baseline_n):
        seed += 1
        elapsed, value = baseline_call(state_path, seed)
        baseline.append(elapsed)
        warm_value = client.call("torch", "forward", seed=seed)
        if abs(warm_value - value) > 1e-4 * max(1.0, abs(value)):
            raise RuntimeError("the daemon computed {} for seed {}, the subprocess {}".format(
                warm_value, seed, value))
        for _ in range(per_round):
            seed += 1
            t0 = time.perf_counter()
            client.call("torch", "forward", seed=seed)
            warm.append(time.perf_counter() - t0)
        log("  round {}/{}: subprocess {:.2f}s".format(round_index + 1, baseline_n, elapsed))
    base, hot = summarize(baseline), summarize(warm)
    return {"subprocess": base, "warm": hot,
            "ratio_mean": base["mean_ms"] / hot["mean_ms"],
            "ratio_p50": base["p50_ms"] / hot["p50_ms"]}


# --- output ------------------------------------------------------------------------

def format_part1(rows):
    lines = ["{:<19} {:<9} {:>9} {:>9} {:>10}".format(
        "path", "payload", "p50 ms", "p99 ms", "calls/s")]
    previous = None
    for row in rows:
        if previous is not None and row["payload"] != previous:
            lines.append("")
        previous = row["payload"]
        lines.append("{:<19} {:<9} {:>9.3f} {:>9.3f} {:>10.0f}".format(
            row["path"], row["payload"], row["p50_ms"], row["p99_ms"], row["calls_per_s"]))
    return "\n".join(lines)


def format_cpu(rows):
    lines = ["{:<19} {:<9} {:>9} {:>15} {:>13} {:>9}".format(
        "path", "payload", "client", "broker/proxy", "daemon/echo", "total")]
    previous = None

    def cell(value):
        return "-" if value is None else "{:.3f}".format(value)

    for row in rows:
        if previous is not None and row["payload"] != previous:
            lines.append("")
        previous = row["payload"]
        parts = [row["cpu_client_ms"], row["cpu_middle_ms"], row["cpu_far_ms"]]
        known = [p for p in parts if p is not None]
        lines.append("{:<19} {:<9} {:>9} {:>15} {:>13} {:>9}".format(
            row["path"], row["payload"], *[cell(p) for p in parts],
            cell(sum(known) if known else None)))
    return "\n".join(lines)


def format_ratio(ratio):
    text = "{} = {:.2f}x".format(ratio["name"], ratio["value"])
    if ratio["target_max"] is not None:
        text += " (target <= {}x: {})".format(ratio["target_max"],
                                              "met" if ratio["met"] else "NOT met")
    return text


def format_part2(result):
    lines = ["{:<28} {:>6} {:>11} {:>11} {:>11}".format(
        "path", "calls", "mean ms", "p50 ms", "p99 ms")]
    for name, key in (("subprocess per call", "subprocess"), ("warm daemon (modelhost)", "warm")):
        s = result[key]
        lines.append("{:<28} {:>6} {:>11.3f} {:>11.3f} {:>11.3f}".format(
            name, s["calls"], s["mean_ms"], s["p50_ms"], s["p99_ms"]))
    lines.append("ratio subprocess / warm: mean {:.0f}x, p50 {:.0f}x (target >= 1000x: {})"
                 .format(result["ratio_mean"], result["ratio_p50"],
                         "met" if result["ratio_mean"] >= 1000 else "NOT met"))
    return "\n".join(lines)


def versions():
    found = {"python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
             "libzmq": zmq.zmq_version(), "msgpack": ".".join(map(str, msgpack.version)),
             "numpy": numpy.__version__, "modelhost": modelhost.__version__}
    try:
        from importlib.metadata import version

        found["torch"] = version("torch")
    except Exception:  # not installed: Part 2 says so
        found["torch"] = None
    return found


def torch_problem():
    """None when Part 2 can run, else why not."""
    if importlib.util.find_spec("torch") is None:
        return ("torch is not importable by {} (install it with `pip install torch==2.13.0`, "
                "the local CPU build)".format(sys.executable))
    return None


# --- main ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument("--skip-torch", action="store_true", help="run Part 1 only")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaving rounds per payload size (default 5, --quick 2)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("endpoints", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return run_role(args.role, args.endpoints)
    rounds = args.rounds or (2 if args.quick else 5)
    # A SIGTERM stops the bench like Ctrl-C: through the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def log(line):
        print(line, file=sys.stderr, flush=True)

    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "rounds": rounds, "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
              "versions": versions()}
    skip_reason = "--skip-torch" if args.skip_torch else torch_problem()
    directory = Path(tempfile.mkdtemp(prefix="mhb-", dir="/tmp"))
    helpers, host, context, client = [], None, None, None
    frames_host, frames_client = None, None
    try:
        state_path = None
        daemons = [daemon_yaml("echo", "echo_engine:EchoEngine", max_queue=4)]
        if skip_reason is None:
            state_path = directory / "bench_model.pt"
            t0 = time.monotonic()
            report["state_dict_bytes"] = build_state_dict(state_path)
            log("built a {:.0f} MiB state dict in {:.1f}s".format(
                report["state_dict_bytes"] / MiB, time.monotonic() - t0))
            daemons.append(daemon_yaml("torch", "torch_engine:TorchEngine",
                                       {"path": str(state_path)}, max_queue=4))

        direct_ep = "ipc://{}/direct.sock".format(directory)
        front_ep = "ipc://{}/proxy-front.sock".format(directory)
        back_ep = "ipc://{}/proxy-back.sock".format(directory)
        helpers.append(start_helper("echo", direct_ep))
        helpers.append(start_helper("proxy", front_ep, back_ep))
        helpers.append(start_helper("worker", back_ep))
        forwarders = {}
        for path, role in (("python forwarder", "forwarder"),
                           ("python fwd+msgpack", "forwarder-msgpack")):
            front, back = ("ipc://{}/{}-{}.sock".format(directory, role, end)
                           for end in ("front", "back"))
            forwarders[path] = (start_helper(role, front, back), start_helper("worker", back),
                                front)
            helpers.extend(forwarders[path][:2])
        host = Host(directory, daemons)
        host.start()
        # The same echo daemon behind a broker with shared memory off: frames only.
        frames_host = Host(directory / "frames", daemons[:1], ["shm: {threshold: off}"])
        frames_host.start()
        names = ["echo"] + (["torch"] if state_path else [])
        ready_after = host.wait_ready(names)
        frames_host.wait_ready(["echo"])
        report["ready_after_s"] = ready_after
        log("modelhost up: {}".format(", ".join(
            "{} ready after {:.1f}s".format(n, s) for n, s in ready_after.items())))

        context = zmq.Context()
        sockets = {}
        for path, endpoint in [("direct", direct_ep), ("proxy", front_ep)] + [
                (path, ends[2]) for path, ends in forwarders.items()]:
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            sockets[path] = socket
        client = modelhost.Client(host.endpoint)
        frames_client = modelhost.Client(frames_host.endpoint)
        pids = {}
        for name, where in (("shm", client), ("frames", frames_client)):
            status = where.ps()
            pids[name] = (status["broker"]["pid"], next(
                row["pid"] for row in status["daemons"] if row["name"] == "echo"))
        report["shm"] = client.ps()["broker"].get("shm")
        processes = {"direct": (None, helpers[0].pid),
                     "proxy": (helpers[1].pid, helpers[2].pid),
                     "python forwarder": tuple(p.pid for p in forwarders["python forwarder"][:2]),
                     "python fwd+msgpack": tuple(
                         p.pid for p in forwarders["python fwd+msgpack"][:2]),
                     "modelhost bytes": pids["shm"],
                     "modelhost ndarray": pids["shm"],
                     "ndarray frames": pids["frames"]}
        callers = {"direct": raw_caller(sockets["direct"]), "proxy": raw_caller(sockets["proxy"]),
                   "python forwarder": raw_caller(sockets["python forwarder"]),
                   "python fwd+msgpack": header_caller(sockets["python fwd+msgpack"]),
                   "modelhost bytes": modelhost_caller(client),
                   "modelhost ndarray": modelhost_caller(client),
                   "ndarray frames": modelhost_caller(frames_client)}

        log("Part 1: round trips over ipc://")
        rows = part1(callers, processes, args.quick, rounds, log)
        report["part1"] = rows
        report["part1_ratios"] = part1_ratios(rows)
        log("the broker's CPU per array call against payload-free calls as long")
        report["broker_same_length_ms"] = {
            path: broker_same_length(callers[path], where, pids[name][0], args.quick)
            for path, name, where in (("modelhost ndarray", "shm", client),
                                      ("ndarray frames", "frames", frames_client))}

        if skip_reason is None:
            log("Part 2: subprocess per call vs warm daemon")
            report["part2"] = part2(client, state_path, args.quick, log)
        else:
            report["part2"] = None
            report["part2_skipped"] = skip_reason
    finally:
        for open_client in (client, frames_client):
            if open_client is not None:
                open_client.close()
        if context is not None:
            context.destroy(linger=0)
        for up in (host, frames_host):
            if up is not None:
                up.stop()
        for helper in helpers:
            stop_process(helper)
        shutil.rmtree(str(directory), ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()

    v = report["versions"]
    print("modelhost overhead bench{} - {}".format(" (--quick)" if args.quick else "",
                                                   report["started"]))
    print("python {python}, pyzmq {pyzmq} (libzmq {libzmq}), msgpack {msgpack}, numpy {numpy}, "
          "torch {torch}".format(**v))
    print("cpus {}, load average at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
          .format(report["cpus"], *(report["loadavg_start"] + report["loadavg_end"])))
    print("")
    print("Part 1: round trip over ipc://, one sequential client, {} interleaved rounds"
          .format(rounds))
    print(format_part1(report["part1"]))
    print("")
    print("CPU ms per call by process (all threads, from each thread's schedstat):")
    print(format_cpu(report["part1"]))
    print("")
    shm = report.get("shm") or {}
    print("broker CPU ms per array call (shared memory from {} bytes in {}) vs per echo "
          "`sleep` call as long with no payload, interleaved in pairs (the difference: what "
          "the payload costs the broker):".format(shm.get("threshold"), shm.get("dir")))
    for line in broker_cpu(report["broker_same_length_ms"]):
        print("  " + line)
    print("")
    print("ratios:")
    for ratio in report["part1_ratios"]:
        print("  " + format_ratio(ratio))
    print("")
    if report["part2"] is not None:
        print("Part 2: subprocess per call vs warm daemon ({:.0f} MiB float32 state dict)"
              .format(report["state_dict_bytes"] / MiB))
        print(format_part2(report["part2"]))
    else:
        print("Part 2 skipped: {}".format(report["part2_skipped"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
