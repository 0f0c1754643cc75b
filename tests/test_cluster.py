"""The cluster mode (modelhost.cluster) on a real two-node Ray cluster on this machine (`ray
start --head` and a worker node, each with one pretend GPU): a node agent on each, calls
routed to both, and one node agent killed in the middle of a load; and a node's derived
configuration."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import modelhost

from conftest import ENGINES, Host, pid_alive

# --- a node's configuration -------------------------------------------------------------------


def test_a_nodes_configuration_keeps_its_daemons_with_absolute_paths(tmp_path, monkeypatch):
    from modelhost.broker.config import load_config
    from modelhost.cluster import node as node_process

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "req.txt").write_text("")
    text = ("broker: {runtime_dir: ./run, state_dir: ./state, http: '127.0.0.1:9999',\n"
            "         frontend: 'tcp://127.0.0.1:5555', heartbeat_s: 0.5}\n"
            "daemons:\n"
            "  a: {engine: 'm:E', python: '3.12', requirements: req.txt, pythonpath: [lib],\n"
            "      options: {x: 1}}\n"
            "  b: {engine: 'm:E', python: '3.12', venv: false}\n"
            "gateway: {}\n"
            "cluster: {daemons: {a: {replicas: 2}}}\n")
    monkeypatch.chdir(tmp_path)  # relative paths are the file's, never the working dir's
    paths = node_process.prepare(text, str(tmp_path / "conf" / "c.yaml"), "n1", ["a"])
    assert paths["runtime_dir"] == str(tmp_path / "conf" / "run" / "nodes" / "n1")
    assert paths["frontend"] == "ipc://{}/frontend.sock".format(paths["runtime_dir"])
    config = load_config(paths["config"])
    assert list(config.daemons) == ["a"] and config.gateway is None
    daemon = config.daemons["a"]
    assert daemon.venv == tmp_path / "conf" / "state" / "venvs" / "a"  # the cluster file's
    assert daemon.requirements == tmp_path / "conf" / "req.txt"
    assert daemon.pythonpath == (tmp_path / "conf" / "lib",) and daemon.options == {"x": 1}
    broker = config.broker
    assert broker.frontend == paths["frontend"] and broker.heartbeat_s == 0.5
    assert broker.state_dir == tmp_path / "conf" / "state" / "nodes" / "n1"
    assert broker.http == ("127.0.0.1", 0)


# --- a real Ray cluster on this machine (modelhost.cluster.local) ------------------------------


def cluster_yaml(directory):
    return (
        "broker:\n"
        "  runtime_dir: {0}/run\n"
        "  state_dir: {0}/state\n"
        # Heartbeats tolerant of a loaded 2-core machine: these tests are about nodes.
        "  heartbeat_s: 1.0\n"
        "  liveness: 5\n"
        "  http: null\n"
        "  log_level: debug\n"
        "daemons:\n"
        "  probe:\n"
        "    engine: probe_engine:ProbeEngine\n"
        "    pythonpath: [{1}]\n"
        "    python: {2}\n"
        "    venv: false\n"
        "  slow:\n"
        "    engine: probe_engine:ProbeEngine\n"
        "    pythonpath: [{1}]\n"
        "    python: {2}\n"
        "    venv: false\n"
        "    preload: false\n"
        "    ready_timeout_s: 600\n"
        "    options: {{load_seconds: 120}}\n"
        "cluster:\n"
        "  status_s: 0.25\n"
        "  daemons:\n"
        "    probe: {{replicas: 2}}\n"
        "    slow: {{replicas: all}}\n").format(directory, ENGINES, sys.executable)


class ClusterUp(object):
    """`modelhost cluster up` on a LocalRayCluster, as its own process."""

    def __init__(self, ray_cluster):
        self.ray = ray_cluster
        self.dir = Path(tempfile.mkdtemp(prefix="mh-c-", dir="/tmp"))  # short: ipc paths
        self.config = self.dir / "cluster.yaml"
        self.config.write_text(cluster_yaml(self.dir))
        self.endpoint = "ipc://{}/run/frontend.sock".format(self.dir)
        self.log_path = self.dir / "up.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "modelhost.cli", "cluster", "up", "--address",
             ray_cluster.address, "--config", str(self.config), "--no-setup"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env=ray_cluster.env)

    def ps(self):
        with modelhost.Client(self.endpoint) as client:
            return client.ps(timeout=5.0)

    def log(self):
        """The Ray nodes' output, each node's node.log, then cluster up's own (last, since
        a failure shows the end)."""
        text = self.ray.logs(1000)
        for path in sorted((self.dir / "run" / "nodes").glob("*/node.log")):
            text += "\n--- {}\n{}".format(path, path.read_text(errors="replace")[-2000:])
        return text + "\n--- cluster up\n" + self.log_path.read_text(errors="replace")[-3000:]

    # Polls ps until the predicate holds, and fails with the log (this class's, with every
    # node's and the Ray nodes') when cluster up exits or time runs out.
    wait_for = Host.wait_for

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                raise AssertionError("cluster up did not stop on SIGINT:\n" + self.log())
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def rows_of(status, daemon):
    return {row["node"]: row for row in status["daemons"] if row["name"] == daemon}


def all_up(status):
    nodes = status.get("nodes") or []
    return len(nodes) == 2 and all(node["state"] == "up" for node in nodes) and all(
        row["state"] == "ready" for row in rows_of(status, "probe").values()) \
        and len(rows_of(status, "probe")) == 2


def open_gate(gate):
    """Let the calls waiting for `gate` go: written whole, then renamed into place, so that
    none reads it half-written."""
    ready = gate.with_name(gate.name + ".tmp")
    ready.write_text("open")
    ready.replace(gate)


def two_calls_at_once_run_on_both_nodes(cluster, gate_name):
    """Two calls of probe at once, each waiting for a file: both are running, one on each
    node, when the test looks (each probe runs one call at a time); then both end."""
    gate = cluster.dir / gate_name
    served = []

    def call():
        with modelhost.Client(cluster.endpoint) as client:
            served.append(client.call("probe", "wait_for_file", path=str(gate), timeout=120))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    cluster.wait_for(lambda s: all(row["running"] == 1 for row in rows_of(
        s, "probe").values()), timeout=60, what="a call running on each node")
    open_gate(gate)
    for thread in threads:
        thread.join(60)
    assert served == ["open", "open"]


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from modelhost.cluster.local import LocalRayCluster

    cluster = LocalRayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def cluster(ray_cluster):
    up = ClusterUp(ray_cluster)
    try:
        up.wait_for(all_up, timeout=120, what="both nodes up with probe ready")
        yield up
    finally:
        up.stop()


@pytest.mark.slow
def test_calls_through_the_router_reach_both_nodes_and_stream_and_cancel(cluster):
    status = cluster.ps()
    nodes = {node["node"]: node for node in status["nodes"]}
    assert sorted(label for node in nodes.values() for label in node["labels"]) == \
        ["node_a", "node_b"]
    assert all(node["daemons"] == ["probe", "slow"] for node in nodes.values())
    # Each node's own modelhost: its own runtime dir and broker.
    assert len({node["runtime_dir"] for node in nodes.values()}) == 2
    assert len({node["broker_pid"] for node in nodes.values()}) == 2
    # The existing Client, unchanged, at the router's endpoint.
    with modelhost.Client(cluster.endpoint) as client:
        assert client.call("probe", "add", a=2, b=3) == 5
        assert client.call("probe", "echo", data=b"\x00" * 300000)["data"] == b"\x00" * 300000
        chunks = list(client.stream("probe", "count", n=4, size=3))
        assert [chunk["blob"] for chunk in chunks] == [bytes([i]) * 3 for i in range(4)]
        progress = []
        assert client.call("probe", "sleep", seconds=0.3, on_progress=progress.append) == 0.3
        assert progress and progress[-1].stage == "sleeping"
        stream = client.stream("probe", "sleep", seconds=30)
        time.sleep(0.5)
        stream.cancel()
        with pytest.raises(modelhost.Cancelled):
            list(stream)
        with pytest.raises(modelhost.UnknownModel, match="no daemon named 'nope' in the cluster"):
            client.call("nope", "info")
        with pytest.raises(modelhost.EngineError):
            client.call("probe", "fail")

    # Two calls at once: one on each node (each probe runs one call at a time).
    two_calls_at_once_run_on_both_nodes(cluster, "gate")
    assert all(node["served"] >= 1 for node in cluster.ps()["nodes"])

    # `modelhost ps` at the router: each row's device names its node.
    out = subprocess.run([sys.executable, "-m", "modelhost.cli", "cluster", "ps", "--endpoint",
                          cluster.endpoint], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in nodes:
        assert "{}/host".format(name) in out.stdout
    assert out.stdout.count("probe") >= 2 and "node_a" in out.stdout


@pytest.mark.slow
def test_a_node_lost_in_the_middle_of_a_load_ends_its_calls_and_comes_back(cluster):
    errors = []

    def slow_call():
        with modelhost.Client(cluster.endpoint) as client:
            try:
                client.call("slow", "info", timeout=300)
            except modelhost.ModelhostError as exc:
                errors.append(exc)

    caller = threading.Thread(target=slow_call)
    caller.start()
    status = cluster.wait_for(lambda s: any(row["state"] == "loading" for row in rows_of(
        s, "slow").values()), timeout=60, what="slow loading on one node")
    lost_name = next(name for name, row in rows_of(status, "slow").items()
                     if row["state"] == "loading")
    lost = next(node for node in status["nodes"] if node["node"] == lost_name)
    other = next(node for node in status["nodes"] if node["node"] != lost_name)
    loading_pid = rows_of(status, "slow")[lost_name]["pid"]
    os.kill(lost["agent_pid"], signal.SIGKILL)  # the node agent dies: the node is lost
    caller.join(60)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], modelhost.DaemonCrashed), errors
    assert "node {}".format(lost_name) in str(errors[0]) and "was lost" in str(errors[0])
    assert errors[0].details.get("node") == lost_name

    # New calls go to the other node.
    other_probe = rows_of(status, "probe")[other["node"]]["pid"]
    with modelhost.Client(cluster.endpoint) as client:
        for _ in range(3):
            assert client.call("probe", "info")["pid"] == other_probe

    # The lost node's modelhost (its supervisor, broker, daemons) went with its agent.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (pid_alive(lost["node_pid"]) or pid_alive(
            lost["broker_pid"]) or pid_alive(loading_pid)):
        time.sleep(0.2)
    assert not pid_alive(lost["node_pid"]) and not pid_alive(lost["broker_pid"])
    assert not pid_alive(loading_pid)

    # Its Ray node is still alive: a new agent re-registers it, and it serves again.
    status = cluster.wait_for(
        lambda s: any(node["node"] == lost_name and node["state"] == "up"
                      and node["agent_pid"] != lost["agent_pid"] for node in s["nodes"])
        and len(rows_of(s, "probe")) == 2 and all(
            row["state"] == "ready" for row in rows_of(s, "probe").values()),
        timeout=120, what="the lost node back")
    two_calls_at_once_run_on_both_nodes(cluster, "gate-after-loss")


@pytest.mark.slow
def test_a_ray_node_that_leaves_ends_its_calls_and_one_that_joins_serves(cluster, ray_cluster):
    """The worker node's Ray stops under a call (its machine leaving), then a new one joins."""
    status = cluster.ps()
    names = {node["node"]: node for node in status["nodes"]}
    leaving = next(name for name, node in names.items() if "node_b" in node["labels"])
    staying = next(name for name in names if name != leaving)
    gate = cluster.dir / "gate-before-leaving"
    outcomes = {}

    def call(index):
        with modelhost.Client(cluster.endpoint) as client:
            try:
                outcomes[index] = client.call("probe", "wait_for_file", path=str(gate),
                                              timeout=120)
            except modelhost.ModelhostError as exc:
                outcomes[index] = exc

    threads = [threading.Thread(target=call, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    cluster.wait_for(lambda s: all(row["running"] == 1 for row in rows_of(
        s, "probe").values()), timeout=60, what="a call running on each node")
    ray_cluster.stop_node("node_b")
    status = cluster.wait_for(lambda s: any(
        node["node"] == leaving and node["state"] == "lost" for node in s["nodes"]),
        timeout=60, what="node_b lost")
    assert next(node for node in status["nodes"] if node["node"] == leaving)["problem"]
    open_gate(gate)
    for thread in threads:
        thread.join(60)
    # The call on the node that left ended with daemon_crashed; the other one ran on.
    assert sorted(type(o).__name__ if isinstance(o, Exception) else o
                  for o in outcomes.values()) == ["DaemonCrashed", "open"], outcomes
    crashed = next(o for o in outcomes.values() if isinstance(o, Exception))
    assert crashed.details["node"] == leaving
    with modelhost.Client(cluster.endpoint) as client:
        assert client.call("probe", "info")["pid"] == rows_of(cluster.ps(), "probe")[
            staying]["pid"]

    # A node joins with node_b's label: a new Ray node (a new id), a new agent, the daemons
    # that the loss left short.
    ray_cluster.add_node("node_b")
    status = cluster.wait_for(lambda s: any(
        node["state"] == "up" and "node_b" in node["labels"] and node["node"] != leaving
        for node in s["nodes"]) and len(rows_of(s, "probe")) == 2 and all(
        row["state"] == "ready" for row in rows_of(s, "probe").values()),
        timeout=120, what="a new node_b up")
    joined = next(node for node in status["nodes"] if node["state"] == "up"
                  and "node_b" in node["labels"])
    assert joined["daemons"] == ["probe", "slow"]
    two_calls_at_once_run_on_both_nodes(cluster, "gate-after-joining")
