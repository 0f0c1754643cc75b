"""What watching modelhost costs: events, metrics and the dashboard's HTTP side.

    python3 bench/telemetry.py [--rounds N] [--calls N]

Part 1, in one process: the cost of one `request` event (the event every
call ends with) through the broker's EventLog with no sinks, against the same
with the broker's sinks (msgpack onto the PUB socket, with a subscriber
connected, and the Prometheus counters and histograms).

Part 2, end to end: small calls (0 B) through two real `modelhost up` hosts
with one echo daemon each, interleaved in rounds so that drift hits both
alike:
  quiet    `http: null` and nobody subscribed (events are still built and
           handed to a PUB socket with no subscriber, which drops them);
  watched  the HTTP server on, a subscriber reading every event, and a
           scraper fetching /metrics, /api/status and /api/events every
           second, as Prometheus and an open dashboard would.
It prints p50 and p99 per host and the ratio watched / quiet.
Nothing here asserts on timings.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import zmq

import modelhost
from modelhost import protocol
from modelhost.broker.events import EventLog
from modelhost.broker.metrics import Metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UpHost, percentile  # noqa: E402

ENGINES = Path(__file__).resolve().parent / "engines"


def request_fields(index):
    return dict(method="echo", rid=str(index), priority="normal", outcome="ok",
                queue_s=0.0001, run_s=0.0008)


def part1(events):
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.bind("inproc://events")
    sub = context.socket(zmq.SUB)
    sub.connect("inproc://events")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    metrics = Metrics(["echo"], lambda: None)
    bare = EventLog()
    full = EventLog(sinks=[lambda event: protocol.send(pub, protocol.encode_event(event)),
                           metrics.observe])
    time.sleep(0.1)  # the inproc subscription takes effect
    results = {"bare": [], "sinks": []}
    for _ in range(5):  # interleaved rounds
        for name, log in (("bare", bare), ("sinks", full)):
            started = time.perf_counter()
            for index in range(events):
                log.emit("request", "echo", **request_fields(index))
            results[name].append((time.perf_counter() - started) / events * 1e6)
            while sub.poll(0):
                sub.recv_multipart()  # keep the subscriber's queue from filling
    bare_us = min(results["bare"])
    sinks_us = min(results["sinks"])
    print("Part 1: one `request` event, best of 5 rounds of {} events".format(events))
    print("  EventLog, no sinks:             {:6.2f} us".format(bare_us))
    print("  EventLog, PUB (subscribed) + metrics: {:6.2f} us  ({:.1f}x; +{:.2f} us per "
          "call)".format(sinks_us, sinks_us / bare_us, sinks_us - bare_us))
    context.destroy(linger=0)
    return {"bare_us": bare_us, "sinks_us": sinks_us}


def daemon_yaml():
    return ("  echo:\n    engine: echo_engine:EchoEngine\n    python: {}\n    venv: false\n"
            "    pythonpath: [{}]\n").format(json.dumps(sys.executable),
                                             json.dumps(str(ENGINES)))


def watch(endpoint, subscribe):
    """The watcher process: subscribe to every event and scrape the HTTP side every second.

    A process of its own, so that its reading does not compete with the
    measuring client for one interpreter's lock.
    """
    client = modelhost.Client(endpoint)
    url = client.ps()["broker"]["http"]
    stream = client.events(timeout=0.1) if subscribe else iter(())
    events = scrapes = after = 0
    next_scrape = time.monotonic()
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("watching", flush=True)
    while not stop.is_set():
        if not subscribe:
            stop.wait(max(0.0, next_scrape - time.monotonic()))
        for _ in stream:
            events += 1
            if time.monotonic() >= next_scrape:
                break
        if time.monotonic() >= next_scrape:
            next_scrape += 1.0
            urllib.request.urlopen(url + "metrics", timeout=5).read()
            urllib.request.urlopen(url + "api/status", timeout=5).read()
            body = urllib.request.urlopen(url + "api/events?after={}".format(after),
                                          timeout=5).read()
            after = json.loads(body)["last"]
            scrapes += 1
        if subscribe and stream.gi_frame is None:  # ended by its timeout: subscribe again
            stream = client.events(timeout=0.1)
    print(json.dumps({"events": events, "scrapes": scrapes}), flush=True)


def wait_ready(host, client):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.ps()["daemons"][0]["state"] == "ready":
                return
        except modelhost.ModelhostError:
            pass
        time.sleep(0.1)
    raise SystemExit("the echo daemon did not become ready:\n" + host.log_tail())


def part2(rounds, calls, directory):
    hosts = {name: UpHost(Path(directory) / name, [http], [daemon_yaml()]) for name, http in (
        ("quiet", "http: null"), ("scraped", 'http: "127.0.0.1:0"'),
        ("watched", 'http: "127.0.0.1:0"'))}
    clients = {}
    watchers = []
    try:
        for name, host in hosts.items():
            host.start()
            clients[name] = modelhost.Client(host.endpoint)
            wait_ready(host, clients[name])
        for name, mode in (("scraped", "scrape"), ("watched", "all")):
            watchers.append(subprocess.Popen(
                [sys.executable, __file__, "--watch", hosts[name].endpoint, "--mode", mode],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            assert watchers[-1].stdout.readline().strip() == "watching"
        for client in clients.values():  # warm up
            for _ in range(200):
                client.call("echo", "echo")
        times = {name: [] for name in hosts}
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(calls):
                    started = time.perf_counter()
                    client.call("echo", "echo")
                    times[name].append((time.perf_counter() - started) * 1e3)
        seen = []
        for watcher in watchers:
            watcher.stdin.close()
            seen.append(json.loads(watcher.stdout.readline()))
            watcher.wait(10)
        print("Part 2: {} rounds x {} calls of 0 B per host, interleaved".format(rounds, calls))
        result = {}
        for name in hosts:
            values = sorted(times[name])
            result[name] = {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99)}
            print("  {:8} p50 {:.3f} ms   p99 {:.3f} ms".format(
                name, result[name]["p50_ms"], result[name]["p99_ms"]))
        for name, watched in zip(("scraped", "watched"), seen):
            print("  {} / quiet: p50 {:.2f}x, p99 {:.2f}x   (its watcher read {} events, "
                  "scraped {} times)".format(
                      name, result[name]["p50_ms"] / result["quiet"]["p50_ms"],
                      result[name]["p99_ms"] / result["quiet"]["p99_ms"],
                      watched["events"], watched["scrapes"]))
        return result
    finally:
        for watcher in watchers:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
        for client in clients.values():
            client.close()
        for host in hosts.values():
            host.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=500, help="calls per host per round")
    parser.add_argument("--events", type=int, default=20000, help="events per round, part 1")
    parser.add_argument("--watch", metavar="ENDPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("scrape", "all"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        watch(args.watch, subscribe=args.mode == "all")
        return
    part1(args.events)
    with tempfile.TemporaryDirectory(prefix="mhb-", dir="/tmp") as directory:
        part2(args.rounds, args.calls, directory)


if __name__ == "__main__":
    main()
