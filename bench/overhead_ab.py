"""bench/overhead.py's modelhost path, this checkout against an earlier commit, in one run.

    python3 bench/overhead_ab.py BASE_REV [ROUNDS]

For a change that must not make calls slower (a restructuring): two `modelhost
up` hosts with an echo daemon, one running BASE_REV's code (exported from git
into a temporary package directory on PYTHONPATH, for the supervisor, the
broker and the daemon alike), one running this checkout's, called in
interleaved rounds with overhead.py's C hop (`proxy`) and Python hops (`python
forwarder`, `python fwd+msgpack`), the order rotating each round, so drift hits
all alike. Prints p50, p99 and mean per path and payload size, the CPU time per
call of each process (the client, the middle: broker or hop, the far end:
daemon or echo worker; from /proc), and the ratios this/base and each/proxy.
The client is this process, with this checkout's code, for both hosts: its
this/base ratio is the run's noise, not a change. Nothing asserts on timings.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy
import zmq

import modelhost

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import overhead  # noqa: E402

SIZES = (("0 B", 0, 500), ("1 MiB", 2**20, 40))


def export_package(rev, directory):
    """A directory whose modelhost/ package is `rev`'s source, laid out as installed."""
    source = directory / "src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        tarfile.open(fileobj=handle).extractall(str(source))
    package = directory / "pkg" / "modelhost"
    shutil.copytree(str(source / "client"), str(package))
    shutil.copytree(str(source / "broker"), str(package / "broker"))
    shutil.copytree(str(source / "daemons"), str(package / "daemons"))
    return str(directory / "pkg")


class EnvHost(overhead.Host):
    def __init__(self, directory, daemons, env):
        # Each its own metrics port (any free one), as the one host of the bench has.
        overhead.UpHost.__init__(self, directory, ["max_payload: 64MiB",
                                                   "http: \"127.0.0.1:0\""], daemons)
        self.env = env


def start_hops(directory):
    """The C and Python hops of overhead.py: {path: (socket endpoint, (middle, worker))}."""
    hops = {}
    for path, role in (("proxy", "proxy"), ("python forwarder", "forwarder"),
                       ("python fwd+msgpack", "forwarder-msgpack")):
        front, back = ("ipc://{}/{}-{}.sock".format(directory, role, end)
                       for end in ("front", "back"))
        hops[path] = (front, (overhead.start_helper(role, front, back),
                              overhead.start_helper("worker", back)))
    return hops


def cpu_cell(seconds, calls):
    return "-" if seconds is None else "{:.3f}".format(seconds / calls * 1e3)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    rev, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
    directory = Path(tempfile.mkdtemp(prefix="mhab-", dir="/tmp"))
    base_pkg = export_package(rev, directory)
    daemons = [overhead.daemon_yaml("echo", "echo_engine:EchoEngine", max_queue=4)]
    base_env = dict(os.environ, PYTHONPATH=base_pkg)
    this_env = dict(os.environ)
    this_env.pop("PYTHONPATH", None)
    hosts = {"base": EnvHost(directory / "base", daemons, base_env),
             "this": EnvHost(directory / "this", daemons, this_env)}
    clients, hops, context = {}, {}, zmq.Context()
    try:
        hops = start_hops(directory)
        for host in hosts.values():
            host.start()
        # path -> (call(payload), (middle pid, far pid))
        paths = {}
        for name, host in hosts.items():
            host.wait_ready(["echo"])
            clients[name] = client = modelhost.Client(host.endpoint)
            status = client.ps()
            pid = status["broker"]["pid"]
            daemon_pid = next(row["pid"] for row in status["daemons"] if row["name"] == "echo")
            # Which code each host's broker runs: its PYTHONPATH, or the installed checkout.
            cmd = open("/proc/{}/environ".format(pid), "rb").read().split(b"\0")
            pp = [e for e in cmd if e.startswith(b"PYTHONPATH=")]
            print("{}: broker pid {} {}".format(name, pid, pp[0].decode() if pp else
                                                "(installed checkout)"), file=sys.stderr)
            paths[name] = (overhead.modelhost_caller(client), (pid, daemon_pid))
        for path, (endpoint, processes) in hops.items():
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
            caller = (overhead.header_caller if path == "python fwd+msgpack"
                      else overhead.raw_caller)(socket)
            paths[path] = (caller, tuple(process.pid for process in processes))

        rng = numpy.random.default_rng(0)
        names = list(paths)
        print("CPU ms per call by process: user+sys, all threads, from /proc (the client is "
              "this process); ratios of p50 and of the processes' CPU")
        for label, size, per_round in SIZES:
            payload = rng.integers(0, 256, size, dtype=numpy.uint8).tobytes()
            lat = {name: [] for name in names}
            cpu_s = {name: [0.0, 0.0, 0.0] for name in names}
            for name in names:
                for _ in range(max(3, per_round // 4)):
                    paths[name][0](payload)
            for round_index in range(rounds):
                # Rotate the order, so that no path always runs first (or last) in a round.
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    call, sink = paths[name][0], lat[name]
                    pids = (os.getpid(),) + paths[name][1]
                    before = [overhead.cpu_seconds(pid) for pid in pids]
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        call(payload)
                        sink.append(time.perf_counter() - t0)
                    for index, pid in enumerate(pids):
                        cpu_s[name][index] += overhead.cpu_seconds(pid) - before[index]
            rows = {name: overhead.summarize(values) for name, values in lat.items()}
            print("{:6} {:19} {:>6} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}".format(
                "size", "path", "calls", "p50", "p99", "mean", "client", "middle", "far",
                "total"))
            for name, row in rows.items():
                row["cpu_s"] = cpu_s[name]
                calls = row["calls"]
                print("{:6} {:19} {:>6} {:>7.3f} {:>7.3f} {:>7.3f} | {:>7} {:>7} {:>7} {:>7}"
                      .format(label, name, calls, row["p50_ms"], row["p99_ms"], row["mean_ms"],
                              *[cpu_cell(s, calls) for s in cpu_s[name] + [sum(cpu_s[name])]]))

            def ratio(a, b):
                ra, rb = rows[a], rows[b]
                parts = ["{:.2f}".format(x / y) if y else "-" for x, y in zip(
                    ra["cpu_s"] + [sum(ra["cpu_s"])], rb["cpu_s"] + [sum(rb["cpu_s"])])]
                print("{:6} {:>28}: p50 {:.2f}, mean {:.2f}; CPU client {}, middle {}, far {}, "
                      "total {}".format(label, a + "/" + b, ra["p50_ms"] / rb["p50_ms"],
                                        ra["mean_ms"] / rb["mean_ms"], *parts))

            ratio("this", "base")
            for name in ("base", "this", "python forwarder", "python fwd+msgpack"):
                ratio(name, "proxy")
            ratio("this", "python fwd+msgpack")
    finally:
        for client in clients.values():
            client.close()
        context.destroy(linger=0)
        for host in hosts.values():
            host.stop()
        for _, processes in hops.values():
            for process in processes:
                overhead.stop_process(process)
        shutil.rmtree(str(directory), ignore_errors=True)


if __name__ == "__main__":
    main()
