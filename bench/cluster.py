"""What the cluster router adds to a call, against a direct call to the node's broker, in one run.

    python3 bench/cluster.py [--calls N] [--quick] [--no-serve] [--json FILE]

A real two-node Ray cluster on this machine (modelhost.cluster.local: `ray start
--head --block` and a worker node, each with one pretend GPU), `modelhost cluster up`
on it with one echo daemon (bench/engines/echo_engine.py, the host interpreter) on
one node, and the same calls on two paths, interleaved call by call (the order
alternating), after a warm-up:

  direct    Client(<that node's broker endpoint>): the node's broker, as on one machine;
  router    Client(<the router's endpoint>): the cluster router, a Ray actor call to
            the node's agent, its client of the same broker.

Calls: echo of 0 B, 64 KiB and 1 MiB (bytes), and a stream of 20 chunks of 4 KiB
(time to the first chunk and to the end). p50 and p95 (nearest rank) per path,
the router's added milliseconds and its ratio to direct at each.

Part 2, why the router is not a Ray Serve deployment: the Ray primitives it could
stand on, measured here too (when `ray[serve]` is installed; --no-serve skips it):
a plain async actor call, an actor's async generator of one item, and a Serve
deployment handle call to an equivalent replica. Nothing here asserts on timings.
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import die_with_parent, percentile  # noqa: E402

import modelhost  # noqa: E402

ENGINES = Path(__file__).resolve().parent / "engines"
SIZES = (("0 B", 0), ("64 KiB", 64 * 2**10), ("1 MiB", 2**20))
STREAM = {"n": 20, "size": 4096}
READY_TIMEOUT_S = 180.0


def cluster_config(directory):
    return ("broker:\n"
            "  runtime_dir: {0}/run\n"
            "  state_dir: {0}/state\n"
            "  http: null\n"
            "  log_level: warning\n"
            "daemons:\n"
            "  echo:\n"
            "    engine: echo_engine:EchoEngine\n"
            "    pythonpath: [{1}]\n"
            "    python: {2}\n"
            "    venv: false\n"
            "cluster:\n"
            "  daemons:\n"
            "    echo: {{replicas: 1}}\n").format(directory, json.dumps(str(ENGINES)),
                                                json.dumps(sys.executable))


def start_cluster_up(directory, address, env):
    config = directory / "cluster.yaml"
    config.write_text(cluster_config(directory))
    log = open(directory / "up.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelhost.cli", "cluster", "up", "--address", address,
         "--config", str(config), "--no-setup"], stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent)
    log.close()
    return process, "ipc://{}/run/frontend.sock".format(directory)


def wait_settled(process, endpoint, directory):
    deadline = time.monotonic() + READY_TIMEOUT_S
    with modelhost.Client(endpoint) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("cluster up exited:\n" + (directory / "up.log").read_text())
            try:
                status = client.ps(timeout=2.0)
                rows = [row for row in status["daemons"] if row["name"] == "echo"]
                if len(status["nodes"]) == 2 and all(n["state"] == "up" for n in status["nodes"]) \
                        and rows and rows[0]["state"] == "ready":
                    return status
            except modelhost.ModelhostError:
                pass
            time.sleep(0.2)
    raise SystemExit("the cluster did not settle:\n" + (directory / "up.log").read_text())


def echo_call(client, data):
    start = time.perf_counter()
    client.call("echo", "echo", data=data, timeout=60)
    return time.perf_counter() - start, None


def stream_call(client, _data):
    start = time.perf_counter()
    first = None
    for _chunk in client.stream("echo", "chunks", timeout=60, **STREAM):
        if first is None:
            first = time.perf_counter() - start
    return time.perf_counter() - start, first


def summary(values):
    ordered = sorted(values)
    return percentile(ordered, 0.5) * 1000, percentile(ordered, 0.95) * 1000


def measure(clients, calls, warmup=20):
    """{row: {path: {"p50", "p95"}}} of every call kind, interleaved over the paths."""
    kinds = [("echo " + label, echo_call, os.urandom(size)) for label, size in SIZES]
    kinds.append(("stream first", stream_call, None))
    results = {}
    for name, call, data in kinds:
        for _ in range(warmup):
            for client in clients.values():
                call(client, data)
        times = {path: ([], []) for path in clients}
        for i in range(calls):
            order = list(clients.items()) if i % 2 == 0 else list(reversed(clients.items()))
            for path, client in order:
                total, first = call(client, data)
                times[path][0].append(total)
                if first is not None:
                    times[path][1].append(first)
        if name == "stream first":
            results["stream first"] = {p: summary(t[1]) for p, t in times.items()}
            results["stream all"] = {p: summary(t[0]) for p, t in times.items()}
        else:
            results[name] = {p: summary(t[0]) for p, t in times.items()}
    return results


SERVE_PART = r"""
import asyncio, json, sys, time
import ray
from ray import serve

ray.init(address=sys.argv[1], logging_level="error", namespace="modelhost-bench")
calls = int(sys.argv[2])

@ray.remote(num_cpus=0)
class Replica:
    async def one(self, data):
        return data
    async def gen(self, data):
        yield data

@serve.deployment(ray_actor_options={"num_cpus": 0})
class ServeReplica:
    async def __call__(self, data):
        return data

serve.start(http_options={"location": "NoServer"})
handle = serve.run(ServeReplica.bind(), name="bench", route_prefix=None)
actor = Replica.remote()

async def main():
    paths = {
        "actor call": lambda: actor.one.remote(b"x"),
        "actor generator": None,
        "serve handle": lambda: handle.remote(b"x"),
    }
    async def generator():
        async for ref in actor.gen.remote(b"x"):
            await ref
    times = {name: [] for name in paths}
    for round in range(calls + 20):
        for name in (paths if round % 2 == 0 else list(reversed(list(paths)))):
            start = time.perf_counter()
            if name == "actor generator":
                await generator()
            else:
                await paths[name]()
            if round >= 20:
                times[name].append(time.perf_counter() - start)
    print(json.dumps({name: sorted(values) for name, values in times.items()}))

asyncio.run(main())
serve.shutdown()
"""


def serve_part(address, calls, env):
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        return None, "skipped: ray[serve] is not installed ({})".format(exc)
    out = subprocess.run([sys.executable, "-c", SERVE_PART, address, str(calls)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        return None, "failed:\n" + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"')]
    if not lines:
        return None, "failed: no figures in its output:\n" + (out.stdout + out.stderr)[-3000:]
    times = json.loads(lines[-1])
    return {name: (percentile(values, 0.5) * 1000, percentile(values, 0.95) * 1000)
            for name, values in times.items()}, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per path and kind")
    parser.add_argument("--quick", action="store_true", help="40 calls per path and kind")
    parser.add_argument("--no-serve", action="store_true", help="skip part 2")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    calls = 40 if args.quick else args.calls
    from modelhost.cluster.local import LocalRayCluster
    import ray

    load_start = os.getloadavg()
    print("modelhost cluster router bench - {}".format(time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    print("python {}, ray {}, pyzmq {}".format(platform.python_version(), ray.__version__,
                                                __import__("zmq").__version__))
    directory = Path(tempfile.mkdtemp(prefix="mh-bench-cl-", dir="/tmp"))
    ray_cluster = LocalRayCluster()
    up = None
    serve = error = None
    try:
        ray_cluster.start()
        up, endpoint = start_cluster_up(directory, ray_cluster.address, ray_cluster.env)
        status = wait_settled(up, endpoint, directory)
        node = next(n for n in status["nodes"] if "echo" in n["daemons"])
        direct = "ipc://{}/frontend.sock".format(node["runtime_dir"])
        clients = {"direct": modelhost.Client(direct), "router": modelhost.Client(endpoint)}
        results = measure(clients, calls)
        for client in clients.values():
            client.close()
        if not args.no_serve:
            serve, error = serve_part(ray_cluster.address, calls, ray_cluster.env)
    finally:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        ray_cluster.stop()
    load_end = os.getloadavg()
    print("cpus {}, load average at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
          .format(os.cpu_count(), *(load_start + load_end)))
    print("{} calls per path and kind, interleaved; ms, nearest-rank percentiles\n".format(calls))
    print("{:<14} {:>10} {:>10} {:>10} {:>10} {:>11} {:>9}".format(
        "call", "direct p50", "direct p95", "router p50", "router p95", "added p50", "ratio"))
    for name, row in results.items():
        (d50, d95), (r50, r95) = row["direct"], row["router"]
        print("{:<14} {:>10.3f} {:>10.3f} {:>10.3f} {:>10.3f} {:>11.3f} {:>8.2f}x".format(
            name, d50, d95, r50, r95, r50 - d50, r50 / d50))
    print("\nratios (router / direct at p50):")
    for name, row in results.items():
        print("  {}: {:.2f}x (+{:.3f} ms)".format(name, row["router"][0] / row["direct"][0],
                                                  row["router"][0] - row["direct"][0]))
    print("\npart 2: the Ray primitives under a router, one request of a few bytes each")
    if serve is None:
        print("  {}".format(error or "skipped (--no-serve)"))
    else:
        for name, (p50, p95) in serve.items():
            print("  {:<16} p50 {:.3f} ms  p95 {:.3f} ms  ({:.2f}x the actor call)".format(
                name, p50, p95, p50 / serve["actor call"][0]))
    if args.json:
        Path(args.json).write_text(json.dumps({"calls": calls, "results": results,
                                               "serve": serve}, indent=2))


if __name__ == "__main__":
    main()
