"""The event stream, the Prometheus endpoint and the dashboard's JSON: a real
`modelhost up` with the probe engine, read through a SUB socket and over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import modelhost
from conftest import daemon_yaml
from modelhost import protocol
from modelhost.broker.config import ConfigError, parse_config
from modelhost.broker.events import EventLog
from modelhost.broker.metrics import Metrics, metric_names


def get(url):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers.get("Content-Type"), answer.read()


def get_json(url):
    return json.loads(get(url)[2])


def samples(exposition, name):
    """{labels text: value} of one metric in Prometheus text."""
    found = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            found[labels[len(name):]] = float(value)
    return found


# --- configuration ------------------------------------------------------------------

def test_http_address_is_loopback_host_port_or_null():
    base = "broker:\n  http: {}\ndaemons: {{}}\n"
    assert parse_config(base.format('"127.0.0.1:0"')).broker.http == ("127.0.0.1", 0)
    assert parse_config(base.format('"[::1]:9466"')).broker.http == ("::1", 9466)
    assert parse_config(base.format("null")).broker.http is None
    assert parse_config("broker: {}\ndaemons: {}\n").broker.http == ("127.0.0.1", 9466)
    with pytest.raises(ConfigError, match="broker.http: '0.0.0.0' is not a loopback address"):
        parse_config(base.format('"0.0.0.0:9466"'))
    with pytest.raises(ConfigError, match="broker.http: expected HOST:PORT"):
        parse_config(base.format('"127.0.0.1:99999"'))
    with pytest.raises(ConfigError, match='broker.http: expected "HOST:PORT" or null'):
        parse_config(base.format("9466"))


def test_events_endpoint_defaults_beside_the_others_and_must_differ(tmp_path):
    config = parse_config("broker:\n  runtime_dir: {}\ndaemons: {{}}\n".format(tmp_path))
    assert config.broker.events == "ipc://{}/events.sock".format(tmp_path)
    with pytest.raises(ConfigError, match="frontend and events are the same endpoint"):
        parse_config("broker:\n  frontend: ipc:///tmp/x.sock\n  events: ipc:///tmp/x.sock\n"
                     "daemons: {}\n")


# --- pieces ---------------------------------------------------------------------------

def test_event_log_numbers_keeps_and_survives_a_failing_sink():
    seen = []

    def broken(event):
        raise RuntimeError("a sink that fails")

    log = EventLog(keep=3, clock=lambda: 100.0, sinks=[broken, seen.append])
    for index in range(5):
        log.emit("move", "tts", to="unloaded", index=index)
    assert [event["seq"] for event in log.recent] == [3, 4, 5]
    assert len(seen) == 5  # the failing sink did not stop the next one
    assert seen[0] == {"seq": 1, "time": 100.0, "kind": "move", "level": "info",
                       "daemon": "tts", "to": "unloaded", "index": 0}
    with pytest.raises(ValueError, match="unknown event kind 'moving'"):
        log.emit("moving", "tts")


def test_metrics_count_events_with_bounded_labels():
    metrics = Metrics(["tts"], lambda: None)
    metrics.observe({"kind": "request", "daemon": "tts", "method": "say", "outcome": "ok",
                     "queue_s": 0.002, "run_s": 0.3})
    metrics.observe({"kind": "request", "daemon": None, "method": None,
                     "outcome": "unknown_model", "queue_s": 0.0, "run_s": None})
    metrics.observe({"kind": "move", "daemon": "tts", "to": "offloaded", "cause": "room",
                     "eviction": True})
    metrics.observe({"kind": "move", "daemon": "tts", "to": "resident", "cause": "request",
                     "eviction": False})
    metrics.observe({"kind": "moved", "daemon": "tts", "tier": "resident", "took_s": 4.0,
                     "failed": False})
    text = metrics.exposition().decode()
    assert samples(text, "modelhost_requests_total") == {
        '{daemon="tts",method="say",outcome="ok"}': 1.0,
        '{daemon="(unknown)",method="(unknown)",outcome="unknown_model"}': 1.0}
    assert samples(text, "modelhost_request_run_seconds_count") == {
        '{daemon="tts",method="say"}': 1.0}  # the one that never ran has no run time
    assert samples(text, "modelhost_request_queue_seconds_count") == {
        '{daemon="tts",method="say"}': 1.0, '{daemon="(unknown)",method="(unknown)"}': 1.0}
    assert samples(text, "modelhost_evictions_total") == {
        '{daemon="tts",reason="room",tier="offloaded"}': 1.0}
    assert samples(text, "modelhost_tier_move_seconds_sum") == {
        '{daemon="tts",tier="resident"}': 4.0}


def test_metric_names_cover_the_documented_set():
    assert metric_names() >= {
        "modelhost_device_memory_total_bytes", "modelhost_device_memory_used_bytes",
        "modelhost_device_memory_threshold_bytes", "modelhost_daemon_tier",
        "modelhost_daemon_state", "modelhost_daemon_memory_bytes",
        "modelhost_daemon_footprint_bytes", "modelhost_daemon_restarts_total",
        "modelhost_daemon_queue_depth", "modelhost_daemon_in_flight",
        "modelhost_requests_total", "modelhost_request_queue_seconds",
        "modelhost_request_run_seconds", "modelhost_evictions_total",
        "modelhost_tier_move_seconds"}


# --- a real broker --------------------------------------------------------------------

@pytest.fixture
def events_host(make_host, test_venvs):
    host = make_host([daemon_yaml("probe", test_venvs["py312"])]).start()
    host.wait_ready("probe")
    return host


def collect(stream, until, limit=200):
    events = []
    for event in stream:
        events.append(event)
        if until(event) or len(events) >= limit:
            break
    return events


@pytest.mark.slow
def test_events_tell_state_changes_moves_requests_and_errors(events_host):
    client = events_host.client()
    # The subscription connects asynchronously: retry until an event gets through.
    for _ in range(5):
        stream = client.events(timeout=5)
        client.call("probe", "add", a=1, b=2)
        first = next(stream, None)
        if first is not None:
            break
    assert first["kind"] == "request" and first["method"] == "add"
    with pytest.raises(modelhost.EngineError):
        client.call("probe", "fail", message="broken on purpose")
    client.unload("probe")
    client.call("probe", "add", a=2)  # loads it again
    events = collect(stream, lambda e: e["kind"] == "request" and e["method"] == "add"
                     and e["outcome"] == "ok")
    kinds = [(e["kind"], e.get("outcome") or e.get("state") or e.get("to") or e.get("tier"))
             for e in events]
    assert ("request", "engine_error") in kinds
    failure = next(e for e in events if e["kind"] == "error")
    assert failure["code"] == "engine_error" and "broken on purpose" in failure["message"]
    assert failure["daemon"] == "probe" and failure["rid"]
    unload = next(e for e in events if e["kind"] == "move" and e["to"] == "unloaded")
    assert unload["cause"] == "unload" and unload["eviction"] is True
    assert ("state", "unloaded") in kinds and ("moved", "unloaded") in kinds
    load = next(e for e in events if e["kind"] == "move" and e["to"] == "resident")
    assert load["cause"] == "request" and load["eviction"] is False
    moved = next(e for e in events if e["kind"] == "moved" and e["tier"] == "resident")
    assert moved["failed"] is False and moved["took_s"] >= 0
    last = events[-1]
    assert last["queue_s"] >= 0 and last["run_s"] >= 0 and last["priority"] == "normal"
    # Numbered in order, with no gaps a subscriber would have to explain.
    seqs = [e["seq"] for e in [first] + events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # A subscription to some kinds sees only those ("move" is not "moved").
    moves = client.events(kinds=["move"], timeout=10)
    client.unload("probe")
    client.load("probe")
    seen = collect(moves, lambda e: e["to"] == "resident")
    assert {e["kind"] for e in seen} == {"move"} and seen[-1]["to"] == "resident"
    with pytest.raises(ValueError, match="unknown event kind"):
        client.events(kinds=["loads"])


@pytest.mark.slow
def test_metrics_and_dashboard_data_over_http(events_host):
    client = events_host.client()
    url = client.ps()["broker"]["http"]
    assert url.startswith("http://127.0.0.1:")
    client.call("probe", "add", a=1)
    client.unload("probe")
    client.call("probe", "add", a=1)
    # The loop publishes once a second: wait for a status that shows the calls.
    deadline = time.monotonic() + 15
    while True:
        status, kind, body = get(url + "metrics")
        text = body.decode()
        if samples(text, "modelhost_requests_total").get(
                '{daemon="probe",method="add",outcome="ok"}') == 2.0 and \
                samples(text, "modelhost_daemon_state").get(
                    '{daemon="probe",state="ready"}') == 1.0:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert status == 200 and kind.startswith("text/plain")
    host_used = samples(text, "modelhost_device_memory_used_bytes")['{device="host"}']
    assert host_used > 0
    assert samples(text, "modelhost_device_memory_threshold_bytes")['{device="host"}'] > 0
    assert samples(text, "modelhost_daemon_memory_bytes")['{daemon="probe",device="host"}'] > 0
    assert samples(text, "modelhost_daemon_tier")['{daemon="probe",tier="resident"}'] == 1.0
    assert samples(text, "modelhost_evictions_total") == {
        '{daemon="probe",reason="unload",tier="unloaded"}': 1.0}
    assert samples(text, "modelhost_tier_move_seconds_count")[
        '{daemon="probe",tier="resident"}'] >= 2  # the first load and the reload
    assert samples(text, "modelhost_daemon_queue_depth") == {'{daemon="probe"}': 0.0}

    status = get_json(url + "api/status")
    assert [d["name"] for d in status["daemons"]] == ["probe"]
    assert status["memory"]["devices"][0]["id"] == "host" and status["time"] > 0
    history = get_json(url + "api/history")
    assert history["interval_s"] == 1.0 and len(history["samples"]) >= 2
    newest = history["samples"][-1]
    assert newest["devices"]["host"]["used"] > 0 and "probe" in newest["daemons"]
    assert [s["time"] for s in history["samples"]] == sorted(s["time"] for s in
                                                            history["samples"])
    events = get_json(url + "api/events?after=0")
    assert events["events"] and events["last"] == events["events"][-1]["seq"]
    assert get_json(url + "api/events?after={}".format(events["last"]))["events"] == []
    assert get(url)[1].startswith("text/html")
    for bad in ("static/../broker.py", "static/nothing.js", "nowhere"):
        with pytest.raises(urllib.error.HTTPError) as error:
            get(url + bad)
        assert error.value.code == 404


@pytest.mark.slow
def test_a_taken_port_leaves_the_broker_routing_without_http(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    runtime = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text("broker:\n  runtime_dir: {}\n  state_dir: {}\n  http: \"127.0.0.1:{}\"\n"
                      "daemons: {{}}\n".format(runtime, tmp_path / "state", port))
    broker = subprocess.Popen([sys.executable, "-m", "modelhost.broker", "--config",
                               str(config)], stderr=subprocess.PIPE)
    try:
        with modelhost.Client("ipc://{}/frontend.sock".format(runtime)) as client:
            status = client.ps(timeout=10)
        assert status["broker"]["http"] is None
    finally:
        broker.terminate()
        _, stderr = broker.communicate(timeout=10)
        taken.close()
    assert "cannot listen on 127.0.0.1:{}".format(port) in stderr.decode()


@pytest.mark.slow
def test_modelhost_events_prints_what_happens(events_host):
    client = events_host.client()
    command = [sys.executable, "-m", "modelhost.cli", "events", "--endpoint",
               events_host.endpoint, "--kind", "request", "--count", "2", "--timeout", "20"]
    people = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    machines = subprocess.Popen(command + ["--json"], stdout=subprocess.PIPE, text=True)
    # Until both have subscribed and seen two requests (their own ps calls are not events).
    deadline = time.monotonic() + 20
    while (people.poll() is None or machines.poll() is None) and time.monotonic() < deadline:
        client.call("probe", "add", a=1, b=1)
        time.sleep(0.1)
    lines = people.communicate(timeout=20)[0].splitlines()
    records = [json.loads(line) for line in machines.communicate(timeout=20)[0].splitlines()]
    assert people.returncode == machines.returncode == 0
    assert len(lines) == 2 and " info    request probe method=add " in lines[0]
    assert "outcome=ok" in lines[0] and "queue_s=" in lines[0]
    assert [r["kind"] for r in records] == ["request", "request"]
    assert records[0]["outcome"] == "ok" and records[0]["daemon"] == "probe"
    bad = subprocess.run(command[:6] + ["--kind", "loads"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'loads'" in bad.stderr
