"""Hostile and malformed peers against a real broker: every case here was once observed
to stop the broker, wedge a request or let a stranger speak for a daemon.

Each test ends by checking that the broker is the same process, `ps` answers and
the real daemon serves a real call.
"""

import json
import os
import signal
import time
import urllib.request

import msgpack
import psutil
import pytest
import zmq

import modelhost
from conftest import daemon_yaml, pid_alive
from modelhost import protocol

pytestmark = pytest.mark.slow

NAN = float("nan")


@pytest.fixture
def host(make_host):
    host = make_host([daemon_yaml("probe", concurrency=2)]).start()
    host.wait_ready("probe")
    return host


def _socket(endpoint, identity=None, monitor_events=None):
    """A raw DEALER; with `monitor_events`, also its monitor, attached before
    connecting so that not even the first CONNECTED can be missed."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        socket.setsockopt(zmq.ROUTING_ID, identity)
    monitor = socket.get_monitor_socket(monitor_events) if monitor_events else None
    socket.connect(endpoint)
    return (socket, monitor) if monitor_events else socket


def _send(socket, header, *payloads):
    socket.send_multipart([msgpack.packb(dict(header, v=protocol.VERSION), use_bin_type=True)]
                          + list(payloads))


def _reply(socket, timeout_s=10.0):
    assert socket.poll(timeout_s * 1000), "no reply within {}s".format(timeout_s)
    return msgpack.unpackb(socket.recv_multipart()[0], raw=False)


def _backend(host):
    return "ipc://{}/backend.sock".format(host.runtime)


def _still_serving(host, broker_pid, daemon_pid):
    status = host.ps()
    assert status["broker"]["pid"] == broker_pid, "the broker was restarted"
    row = next(d for d in status["daemons"] if d["name"] == "probe")
    assert row["pid"] == daemon_pid and row["state"] in ("ready", "busy"), row
    assert host.client().call("probe", "echo", data=b"\x00\xffsame bytes")["data"] == \
        b"\x00\xffsame bytes"


def _wait_for_event(monitor, event, timeout_s=20.0):
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(100) and recv_monitor_message(monitor)["event"] == event:
            return
    raise AssertionError("no socket event {} within {}s".format(event, timeout_s))


def _pids(host):
    status = host.ps()
    return status["broker"]["pid"], host.daemon("probe")["pid"]


def _wait_for_log(host, text, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in host.log():
            return
        time.sleep(0.05)
    raise AssertionError("{!r} never appeared in the log:\n{}".format(text, host.log()[-4000:]))


def test_client_messages_with_hostile_fields_each_get_bad_message(host):
    broker_pid, daemon_pid = _pids(host)
    raw = _socket(host.endpoint)
    cases = [
        ({"op": "call", "id": NAN, "model": "probe", "method": "add"}, None),
        ({"op": "call", "id": [1], "model": "probe", "method": "add"}, None),
        ({"op": "call", "id": {"a": 1}, "model": "probe", "method": "add"}, None),
        ({"op": "call", "id": True, "model": "probe", "method": "add"}, None),
        ({"op": "call", "id": "x" * 300, "model": "probe", "method": "add"}, None),
        ({"op": "call", "id": 1, "model": "probe", "method": "add", "timeout": NAN}, 1),
        ({"op": "call", "id": 2, "model": "probe", "method": "add", "timeout": float("inf")}, 2),
        ({"op": "call", "id": 3, "model": "probe", "method": "add", "timeout": -1}, 3),
        ({"op": "call", "id": 4, "model": ["probe"], "method": "add"}, 4),
        ({"op": "call", "id": 5, "model": "probe", "method": "add", "priority": ["x"]}, 5),
        ({"op": "call", "id": 6, "model": "probe", "method": "add", "stream": "yes"}, 6),
        ({"op": "ping", "id": 7, "ids": [[1, 2], {"a": 1}]}, 7),
        ({"op": "ping", "id": 8, "ids": {"a": 1}}, 8),
        ({"op": "pin", "id": 9, "model": ["probe"]}, 9),
        ({"op": "unpin", "id": 10, "model": {"a": 1}}, 10),
        ({"op": "cancel", "id": {"a": 1}}, None),
        ({"op": "load", "id": 11, "model": "probe", "timeout": NAN}, 11),
        ({"op": "ps", "id": NAN}, None),
        ({"op": ["call"], "id": 12}, 12),
    ]
    for header, expected_id in cases:
        _send(raw, header)
        reply = _reply(raw)
        assert reply["kind"] == "error" and reply["code"] == "bad_message", (header, reply)
        assert reply["id"] == expected_id, (header, reply)
    # A NaN timeout once stalled every deadline: a real deadline still fires.
    with pytest.raises(modelhost.Timeout):
        host.client().call("probe", "sleep", seconds=30.0, timeout=0.5)
    _still_serving(host, broker_pid, daemon_pid)


def test_a_supervisor_report_from_a_client_is_refused(host):
    broker_pid, daemon_pid = _pids(host)
    raw = _socket(host.endpoint)
    for header in ({"op": "supervisor", "id": 1, "processes": {"probe": 5}},
                   {"op": "supervisor", "id": 2, "processes": {"probe": {"status": "failed"}},
                    "token": "guess"},
                   {"op": "supervisor", "id": 3, "processes": {"probe": {"status": "stopped",
                                                                          "pid": 1}}}):
        _send(raw, header)
        reply = _reply(raw)
        assert reply["kind"] == "error" and reply["code"] == "bad_message", reply
    # The dashboard publishes the status once a second: it must still render.
    url = host.ps()["broker"]["http"]
    published = json.load(urllib.request.urlopen(url + "api/status", timeout=5))["time"]
    deadline = time.monotonic() + 10
    while json.load(urllib.request.urlopen(url + "api/status", timeout=5))["time"] == published:
        assert time.monotonic() < deadline, "the dashboard stopped publishing"
        time.sleep(0.1)
    # The real supervisor's reports still arrive: the daemon shows its restarts count.
    assert host.daemon("probe")["state"] == "ready"
    _still_serving(host, broker_pid, daemon_pid)


def test_hostile_daemon_messages_are_dropped_and_the_broker_goes_on(host):
    broker_pid, daemon_pid = _pids(host)
    fake = _socket(_backend(host), b"probe:999999:control")
    base = {"op": "register", "name": "ghost", "pid": 999999}
    for header in (dict(base, state=["ready"]), dict(base, state={"a": 1}),
                   dict(base, state="ready", mem={"rss": "a lot"}),
                   dict(base, state="ready", slots=[1, 2]),
                   dict(base, state="ready", running=[{"id": NAN, "client": b"c"}]),
                   {"op": "state", "state": ["ready"]},
                   {"op": "heartbeat", "mem": {"rss": "12"}},
                   {"op": "state", "state": "ready", "took_s": NAN},
                   {"kind": "result", "id": [1], "client": b"c"},
                   {"kind": "result", "id": 1, "client": "not bytes"},
                   {"kind": "progress", "id": 1, "client": b"c", "fraction": NAN},
                   {"kind": {"a": 1}}, {"op": 5}):
        _send(fake, header)
    fake.send_multipart([b"\xc1not msgpack"])
    fake.send_multipart([msgpack.packb([1, 2])])
    # The last of them reached the broker's log.
    _wait_for_log(host, "the header frame must be a msgpack map, not list")
    _still_serving(host, broker_pid, daemon_pid)
    fake.close()
    # A restarted broker once crashed again on the queued message: a real broker
    # restart with such a message waiting must serve too.


def test_a_register_under_a_live_daemons_name_is_refused(host):
    broker_pid, daemon_pid = _pids(host)
    me = os.getpid()  # alive, and not the daemon
    fake = _socket(_backend(host), "probe:{}:control".format(me).encode())
    _send(fake, {"op": "register", "name": "probe", "pid": me, "state": "ready",
                 "tier": "resident", "methods": ["add"],
                 "slots": ["probe:{}:s0".format(me).encode()]})
    reply = _reply(fake)
    assert reply["kind"] == "error" and "registered by pid {}".format(daemon_pid) in \
        reply["message"]
    assert host.daemon("probe")["pid"] == daemon_pid
    _still_serving(host, broker_pid, daemon_pid)


def test_a_reply_from_a_socket_the_call_was_not_sent_to_is_refused(host):
    broker_pid, daemon_pid = _pids(host)
    identity = b"c-hostile-test"
    client = _socket(host.endpoint, identity)
    marker = str(host.dir / "never")
    _send(client, {"op": "call", "id": 1, "model": "probe", "method": "wait_for_file",
                   "args": {"path": marker}})
    host.wait_for(lambda s: s["daemons"][0]["running"] == 1, what="the call to run")
    forged = {"kind": "result", "id": 1, "client": identity, "value": "forged"}
    # A stranger that never registered, and the daemon's other (idle) slot.
    for sender in (b"stranger", "probe:{}:s1".format(daemon_pid).encode()):
        fake = _socket(_backend(host), sender)
        _send(fake, forged)
    _wait_for_log(host, "refused a reply from b'probe:{}:s1'".format(daemon_pid))
    _send(client, {"op": "cancel", "id": 1})
    replies = []
    while not replies or replies[-1]["kind"] not in protocol.TERMINAL_KINDS:
        replies.append(_reply(client))
    assert [r["kind"] for r in replies if r["kind"] != "progress"] == ["cancelled"], replies
    _still_serving(host, broker_pid, daemon_pid)


def test_a_frame_over_the_daemon_cap_costs_the_broker_no_memory(make_host):
    # Frames, which the cap is for: a reply in shared memory never reaches the broker's
    # socket.
    host = make_host([daemon_yaml("probe")], {"max_reply": "8MiB",
                                              "shm": "{threshold: off}"}).start()
    host.wait_ready("probe")
    broker_pid, daemon_pid = _pids(host)
    before = psutil.Process(broker_pid).memory_info().rss
    fake = _socket(_backend(host), b"big")
    blob = b"\0" * (300 * 2**20)
    fake.send_multipart([msgpack.packb({"v": 1, "kind": "result", "id": 1, "client": b"c"}),
                         blob])
    del blob
    _still_serving(host, broker_pid, daemon_pid)
    assert psutil.Process(broker_pid).memory_info().rss - before < 64 * 2**20
    # A daemon's own reply over the cap is answered payload_too_large, not lost.
    with pytest.raises(modelhost.PayloadTooLarge, match="max_reply"):
        host.client().call("probe", "echo", data=b"\0" * (4 * 2**20), extra=b"\0" * (9 * 2**20))
    with pytest.raises(modelhost.PayloadTooLarge, match="max_reply"):
        list(host.client().stream("probe", "count", n=2, size=9 * 2**20))
    _still_serving(host, broker_pid, daemon_pid)


def test_a_result_finished_while_the_broker_was_down_reaches_its_client(make_host):
    host = make_host([daemon_yaml("probe")]).start()
    host.wait_ready("probe")
    status = host.ps()
    broker = psutil.Process(status["broker"]["pid"])
    supervisor = psutil.Process(host.process.pid)
    client = host.client(broker_timeout=60)
    release, done = host.dir / "release", host.dir / "done"
    stream = client.stream("probe", "wait_for_file", path=str(release), done=str(done))
    host.wait_for(lambda s: s["daemons"][0]["running"] == 1, what="the call to run")
    # Hold the supervisor so the broker stays down until the call is over.
    supervisor.send_signal(signal.SIGSTOP)
    try:
        broker.kill()
        while pid_alive(broker.pid):  # a zombie until the held supervisor reaps it
            time.sleep(0.02)
        release.write_text("finished while the broker was down")
        deadline = time.monotonic() + 20
        while not done.exists():
            assert time.monotonic() < deadline, "the call never finished"
            time.sleep(0.02)
    finally:
        supervisor.send_signal(signal.SIGCONT)
    try:
        assert list(stream) == []
    except Exception:
        print(host.log()[-8000:])
        raise
    assert stream.result == "finished while the broker was down"
    assert host.ps()["broker"]["pid"] != broker.pid


def test_a_broker_restart_with_a_hostile_message_queued_still_serves(host):
    """A register with a list as state, queued while the broker is down, once
    crashed every broker that came up to read it."""
    old_pid, daemon_pid = _pids(host)
    supervisor = psutil.Process(host.process.pid)
    fake, monitor = _socket(_backend(host), b"ghost:1:control",
                            monitor_events=zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    _wait_for_event(monitor, zmq.EVENT_CONNECTED)
    supervisor.send_signal(signal.SIGSTOP)
    try:
        psutil.Process(old_pid).kill()
        # Queued only once ZeroMQ knows the connection is gone: a message written
        # into the dying connection would be lost, and the test would prove nothing.
        _wait_for_event(monitor, zmq.EVENT_DISCONNECTED)
        _send(fake, {"op": "register", "name": "probe", "pid": 1, "state": ["ready"]})
    finally:
        supervisor.send_signal(signal.SIGCONT)
    host.wait_for(lambda s: s["broker"]["pid"] != old_pid and s["daemons"][0]["state"] == "ready",
                  what="a new broker with the daemon registered")
    new_pid, _ = _pids(host)
    _wait_for_log(host, "`state` of a register message must be")
    _still_serving(host, new_pid, daemon_pid)
