"""bench/overhead.py's modelhost path, this checkout against an earlier commit, in one run.

    python3 bench/overhead_ab.py BASE_REV [ROUNDS]

For a change that must not make calls slower (a restructuring): two `modelhost
up` hosts with an echo daemon, one running BASE_REV's code (exported from git
into a temporary package directory on PYTHONPATH, for the supervisor, the
broker and the daemon alike), one running this checkout's, called in
interleaved rounds (the order flips each round, so drift hits both). Prints
p50, p99 and mean per host and payload size, the broker's CPU time per call
(from /proc), and the ratios this/base. Nothing asserts on timings.
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

import modelhost

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import overhead  # noqa: E402

SIZES = (("0 B", 0, 300), ("1 MiB", 2**20, 40))


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
    clients = {}
    try:
        for host in hosts.values():
            host.start()
        for name, host in hosts.items():
            host.wait_ready(["echo"])
            clients[name] = modelhost.Client(host.endpoint)
        # Which code each host's broker runs: its PYTHONPATH, or the installed checkout.
        for name, host in hosts.items():
            pid = clients[name].ps()["broker"]["pid"]
            cmd = open("/proc/{}/environ".format(pid), "rb").read().split(b"\0")
            pp = [e for e in cmd if e.startswith(b"PYTHONPATH=")]
            print("{}: broker pid {} {}".format(name, pid, pp[0].decode() if pp else
                                                "(installed checkout)"), file=sys.stderr)
        broker_pids = {name: clients[name].ps()["broker"]["pid"] for name in hosts}

        def cpu(pid):
            fields = open("/proc/{}/stat".format(pid)).read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        rng = numpy.random.default_rng(0)
        for label, size, per_round in SIZES:
            payload = rng.integers(0, 256, size, dtype=numpy.uint8).tobytes()
            lat = {name: [] for name in hosts}
            cpu_s = {name: 0.0 for name in hosts}
            for name in hosts:
                for _ in range(max(3, per_round // 4)):
                    clients[name].call("echo", "echo", data=payload)
            for round_index in range(rounds):
                order = list(hosts) if round_index % 2 == 0 else list(hosts)[::-1]
                for name in order:
                    call, sink = clients[name].call, lat[name]
                    before = cpu(broker_pids[name])
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        call("echo", "echo", data=payload)
                        sink.append(time.perf_counter() - t0)
                    cpu_s[name] += cpu(broker_pids[name]) - before
            rows = {name: overhead.summarize(values) for name, values in lat.items()}
            for name, row in rows.items():
                row["cpu_us"] = cpu_s[name] / row["calls"] * 1e6
                print("{:6} {:6}: {} calls, p50 {:.3f} ms, p99 {:.3f} ms, mean {:.3f} ms, "
                      "broker CPU {:.0f} us/call".format(
                          label, name, row["calls"], row["p50_ms"], row["p99_ms"],
                          row["mean_ms"], row["cpu_us"]))
            print("{:6} this/base: p50 {:.3f}, mean {:.3f}, broker CPU {:.3f}".format(
                label, rows["this"]["p50_ms"] / rows["base"]["p50_ms"],
                rows["this"]["mean_ms"] / rows["base"]["mean_ms"],
                rows["this"]["cpu_us"] / rows["base"]["cpu_us"]))
    finally:
        for client in clients.values():
            client.close()
        for host in hosts.values():
            host.stop()
        shutil.rmtree(str(directory), ignore_errors=True)


if __name__ == "__main__":
    main()
