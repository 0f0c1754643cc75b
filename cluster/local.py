"""A Ray cluster of simulated nodes on this one machine, for the tests and the benchmark.

`ray start --head --block` and one `ray start --address HEAD --block` per further node,
each its own process group, on loopback with a GCS port of its own, small (one CPU, an
80 MB object store, no dashboard), each node with one pretend GPU and a custom resource
naming it (so its modelhost labels tell the nodes apart). Stopped with SIGINT (which
`ray start --block` takes as "stop this node"), then SIGKILL of what is left of each
group: nothing else on the machine is touched (`ray stop` would stop every Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalRayCluster:
    def __init__(self, nodes=("node_a", "node_b"), *, ray=None):
        self.nodes = list(nodes)
        self.ray = ray or str(Path(sys.executable).parent / "ray")
        self.dir = Path(tempfile.mkdtemp(prefix="mh-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = "127.0.0.1:{}".format(self.port)
        self.processes: list[subprocess.Popen] = []
        self.by_name: dict[str, subprocess.Popen] = {}  # node -> its latest `ray start`
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.dir / (name + ".log"), "wb")
        command = [self.ray, "start", "--block", "--node-ip-address", "127.0.0.1",
                   "--num-cpus", "1", "--num-gpus", "1", "--resources", json.dumps({name: 1}),
                   "--object-store-memory", "80000000", "--disable-usage-stats",
                   "--dashboard-agent-listen-port", str(free_port())] + args
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=self.env,
                                   start_new_session=True)
        log.close()
        self.processes.append(process)
        self.by_name[name] = process

    def start(self, timeout: float = 120.0) -> "LocalRayCluster":
        self._start(self.nodes[0], ["--head", "--port", str(self.port), "--include-dashboard",
                                    "false", "--temp-dir", str(self.dir / "tmp")])
        self._wait_for_head(timeout)
        for name in self.nodes[1:]:
            self._start(name, ["--address", self.address])
        self.wait_nodes(len(self.nodes), timeout)
        return self

    def _wait_for_head(self, timeout: float) -> None:
        # The GCS port first: a driver that connects to nothing retries for minutes.
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Ray head did not come up:\n" + self.logs())
                time.sleep(0.2)

    def stop_node(self, name: str) -> None:
        """Stop one worker node, as when its machine leaves the cluster."""
        process = self.by_name.pop(name)
        self.processes.remove(process)
        _stop([process])

    def add_node(self, name: str, timeout: float = 120.0) -> None:
        """Start a worker node (again): a new Ray node, with a new node id."""
        self._start(name, ["--address", self.address])
        self.wait_nodes(len(self.processes), timeout)

    def _check_alive(self) -> None:
        dead = [" ".join(p.args[:3]) for p in self.processes if p.poll() is not None]
        if dead:
            raise RuntimeError("ray start exited: {}\n{}".format(dead, self.logs()))

    def wait_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Until `count` Ray nodes are alive (asked from a driver of its own)."""
        script = ("import ray, time\nray.init(address={!r}, logging_level='error')\n"
                  "deadline = time.time() + {}\n"
                  "while sum(n['Alive'] for n in ray.nodes()) < {} and time.time() < deadline:\n"
                  "    time.sleep(0.5)\n"
                  "print(sum(n['Alive'] for n in ray.nodes()))\n").format(
                      self.address, timeout, count)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=self.env, timeout=timeout + 60)
        self._check_alive()
        if not out.stdout.strip().endswith(str(count)):
            raise RuntimeError("{} Ray nodes did not come up:\n{}{}\n{}".format(
                count, out.stdout, out.stderr, self.logs()))

    def logs(self, chars: int = 3000) -> str:
        return "\n".join("--- {}\n{}".format(path.name, path.read_text(errors="replace")[-chars:])
                         for path in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        _stop(list(reversed(self.processes)))
        self.processes, self.by_name = [], {}
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever of its group is left
        except (ProcessLookupError, PermissionError):
            pass
