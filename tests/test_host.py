"""End to end: a real `modelhost up` with the broker and daemons as separate processes."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy
import pytest
import zmq

import modelhost
from conftest import daemon_yaml, pid_alive
from modelhost import protocol

pytestmark = pytest.mark.slow


def test_daemons_in_separate_venvs_report_their_own_interpreter_and_numpy(make_host, test_venvs):
    host = make_host([daemon_yaml("old", test_venvs["py37"]),
                      daemon_yaml("new", test_venvs["py312"])]).start()
    host.wait_ready("old", "new")
    client = host.client()
    old = client.call("old", "info")
    new = client.call("new", "info")
    assert old["python"].startswith("3.7.") and old["numpy"].startswith("1.")
    assert new["python"].startswith("3.12.") and new["numpy"].startswith("2.")
    assert old["prefix"] == str(test_venvs["py37"]) and new["prefix"] == str(test_venvs["py312"])
    # The broker itself runs on the host interpreter, unlike both.
    assert sys.version_info[:2] not in ((3, 7), (3, 12))
    rows = {d["name"]: d for d in host.ps()["daemons"]}
    assert rows["old"]["python"] == old["python"] and rows["new"]["python"] == new["python"]
    # numpy arrays cross between numpy 1.x and 2.x daemons bit-exactly.
    data = numpy.arange(1000, dtype=">f8").reshape(10, 100)
    for name in ("old", "new"):
        echoed = client.call(name, "echo", data=data)["data"]
        assert echoed.dtype == data.dtype and numpy.array_equal(echoed, data)


def test_first_array_call_while_another_slot_answers_on_fresh_daemons(make_host, test_venvs):
    # Each daemon is a fresh interpreter with numpy not imported yet: the
    # first call carrying an array imports it on one slot while the other slot
    # answers calls; none of them may meet numpy half imported.
    names = ["{}-{}".format(venv, i) for venv in ("py37", "py312") for i in range(2)]
    host = make_host([daemon_yaml(name, test_venvs[name.split("-")[0]], concurrency=2,
                                  max_queue=64) for name in names]).start()
    host.wait_ready(*names)
    client = host.client()
    data = numpy.arange(100000, dtype="<f4")
    streams = []
    for name in names:
        streams.append((name, "echo", client.stream(name, "echo", data=data)))
        streams += [(name, i, client.stream(name, "add", a=i)) for i in range(40)]
    for name, what, stream in streams:
        assert list(stream) == []
        if what == "echo":
            assert numpy.array_equal(stream.result["data"], data), name
        else:
            assert stream.result == what, name


def test_second_call_does_not_reload(probe_host):
    client = probe_host.client()
    first = client.call("probe", "info")
    second = client.call("probe", "info")
    assert first["loads"] == second["loads"] == 1
    assert first["pid"] == second["pid"]
    assert second["calls"] == 2
    assert probe_host.daemon("probe")["loads"] == 1


def test_kill_9_during_a_call_gives_daemon_crashed_and_the_daemon_comes_back(probe_host):
    client = probe_host.client()
    pid = client.call("probe", "info")["pid"]
    outcome = {}

    def call():
        try:
            outcome["value"] = client.call("probe", "sleep", seconds=30)
        except modelhost.ModelhostError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "busy", 10, "the call to start")
    os.kill(pid, signal.SIGKILL)
    caller.join(15)
    assert isinstance(outcome.get("error"), modelhost.DaemonCrashed), outcome
    probe_host.wait_for(
        lambda s: s["daemons"][0]["state"] == "ready" and s["daemons"][0]["pid"] != pid
        and s["daemons"][0]["restarts"] == 1, 30, "the daemon to be restarted")
    fresh = probe_host.client()
    assert fresh.call("probe", "add", a=2, b=3) == 5
    assert fresh.call("probe", "info")["pid"] != pid


def test_kill_9_of_the_broker_daemons_reregister_without_reloading(make_host, test_venvs):
    host = make_host([daemon_yaml("old", test_venvs["py37"]), daemon_yaml("probe")]).start()
    host.wait_ready("old", "probe")
    client = host.client()
    before = {name: client.call(name, "info") for name in ("old", "probe")}
    broker = host.ps()["broker"]
    os.kill(broker["pid"], signal.SIGKILL)
    host.wait_for(lambda s: s["broker"]["instance"] != broker["instance"]
                  and all(d["state"] == "ready" for d in s["daemons"]),
                  30, "a new broker with both daemons registered")
    for name in ("old", "probe"):
        after = client.call(name, "info")
        assert after["pid"] == before[name]["pid"]
        assert after["loads"] == 1


def test_across_a_broker_restart_running_calls_finish_and_queued_ones_are_lost(probe_host):
    client = probe_host.client()
    broker = probe_host.ps()["broker"]
    running = client.stream("probe", "sleep", seconds=6)
    queued = client.stream("probe", "note", tag="queued-when-the-broker-died")
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "busy", 10, "the call to start")
    os.kill(broker["pid"], signal.SIGKILL)
    # The queued call died with the broker: its client learns it, in words.
    with pytest.raises(modelhost.RequestLost, match="no record of request"):
        list(queued)
    # The running one was adopted by the new broker and its result delivered.
    assert list(running) == [] and running.result == 6
    assert "queued-when-the-broker-died" not in client.call("probe", "noted")


def test_cancel_running_call(probe_host):
    client = probe_host.client()
    stream = client.stream("probe", "sleep", seconds=30)
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "busy", 10, "the call to start")
    started = time.monotonic()
    stream.cancel()
    with pytest.raises(modelhost.Cancelled):
        list(stream)
    assert time.monotonic() - started < 5
    assert client.call("probe", "add", a=1) == 1


def test_cancel_queued_call_never_runs(probe_host):
    client = probe_host.client()
    busy = client.stream("probe", "sleep", seconds=1.5)
    queued = client.stream("probe", "note", tag="cancelled-while-queued")
    queued.cancel()
    with pytest.raises(modelhost.Cancelled, match="before it started"):
        list(queued)
    list(busy)
    assert busy.result == 1.5
    assert "cancelled-while-queued" not in client.call("probe", "noted")


def test_deadline_of_a_running_call(probe_host):
    client = probe_host.client()
    started = time.monotonic()
    with pytest.raises(modelhost.Timeout):
        client.call("probe", "sleep", seconds=30, timeout=0.5)
    assert time.monotonic() - started < 3
    # The daemon was told to stop, so it serves the next call promptly.
    assert client.call("probe", "add", a=4, timeout=5) == 4


def test_deadline_of_a_queued_call(probe_host):
    client = probe_host.client()
    busy = client.stream("probe", "sleep", seconds=2)
    with pytest.raises(modelhost.Timeout, match="still queued"):
        client.call("probe", "note", tag="expired-in-queue", timeout=0.5)
    list(busy)
    assert "expired-in-queue" not in client.call("probe", "noted")


def test_full_queue_answers_over_capacity_at_once(probe_host):
    client = probe_host.client()
    running = client.stream("probe", "sleep", seconds=2)
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "busy", 10, "the call to start")
    queued = [client.stream("probe", "add", a=i) for i in range(3)]  # max_queue is 3
    started = time.monotonic()
    with pytest.raises(modelhost.OverCapacity):
        client.call("probe", "add", a=99)
    assert time.monotonic() - started < 1
    list(running)
    results = []
    for stream in queued:
        list(stream)
        results.append(stream.result)
    assert results == [0, 1, 2]


def test_client_that_goes_away_has_its_queued_work_dropped(probe_host):
    keeper = probe_host.client()
    # Longer than the test host's client_liveness_s (3 s), so the leaver's call
    # is still queued when the broker notices it is gone.
    busy = keeper.stream("probe", "sleep", seconds=4.5)
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "busy", 10, "the call to start")
    leaver = modelhost.Client(probe_host.endpoint)
    leaver.stream("probe", "note", tag="from-a-client-that-left")
    leaver.close()
    list(busy)
    probe_host.wait_for(lambda s: s["daemons"][0]["queued"] == 0, 10, "the queue to empty")
    time.sleep(0.5)
    assert "from-a-client-that-left" not in keeper.call("probe", "noted")


def _raw_socket(endpoint):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(endpoint)
    return socket


def test_malformed_frames_get_an_error_and_the_broker_keeps_serving(probe_host):
    import msgpack

    raw = _raw_socket(probe_host.endpoint)
    cases = [
        ([b"\xc1garbage"], "bad_message"),
        ([msgpack.packb([1, 2, 3])], "bad_message"),
        ([msgpack.packb({"v": 999, "op": "call", "id": 7})], "protocol_mismatch"),
        ([msgpack.packb({"v": protocol.VERSION, "op": "call", "model": "probe"})], "bad_message"),
        ([msgpack.packb({"v": protocol.VERSION, "op": "dance", "id": 3})], "bad_message"),
        ([msgpack.packb({"v": protocol.VERSION, "op": "call", "id": 4, "model": "probe",
                         "method": "add", "args": [1, 2]})], "bad_arguments"),
        ([msgpack.packb({"v": protocol.VERSION, "op": "call", "id": 5, "model": "probe",
                         "method": "echo", "args": {"data": msgpack.ExtType(1, b"\x05")}})],
         "bad_message"),
    ]
    for frames, code in cases:
        raw.send_multipart(frames)
        header = msgpack.unpackb(raw.recv_multipart()[0], raw=False)
        assert header["kind"] == "error" and header["code"] == code, (frames, header)
    assert "protocol 1" in header["message"] or code != "protocol_mismatch"
    # A payload reference to a frame that is not there is caught in the daemon.
    assert probe_host.client().call("probe", "add", a=1, b=1) == 2


def test_bad_requests_each_get_their_error(probe_host):
    client = probe_host.client()
    with pytest.raises(modelhost.UnknownModel, match="probe"):
        client.call("nope", "info")
    with pytest.raises(modelhost.UnknownMethod, match="add, count"):
        client.call("probe", "dance")
    with pytest.raises(modelhost.BadArguments, match="'a' must be int"):
        client.call("probe", "add", a="one")
    with pytest.raises(modelhost.BadArguments, match="unexpected keyword|accepted arguments"):
        client.call("probe", "add", a=1, c=2)
    with pytest.raises(modelhost.PayloadTooLarge, match="33554432"):
        client.call("probe", "echo", data=b"\0" * (33 * 2**20))
    with pytest.raises(modelhost.EngineError, match="ValueError: kaput"):
        client.call("probe", "fail", message="kaput")
    assert client.call("probe", "add", a=20, b=22) == 42


def test_streaming_is_ordered_and_complete(probe_host):
    client = probe_host.client()
    stream = client.stream("probe", "count", n=500, size=300)
    chunks = list(stream)
    assert [c["index"] for c in chunks] == list(range(500))
    assert all(c["blob"] == bytes([c["index"] % 256]) * 300 for c in chunks)
    assert stream.result == {"sent": 500}


def test_binary_payloads_round_trip_bit_exactly(probe_host):
    client = probe_host.client()
    rng = numpy.random.default_rng(7)
    for size in (0, 1, 4096, 5 * 2**20 + 3):
        blob = rng.integers(0, 256, size, dtype=numpy.uint8).tobytes()
        assert client.call("probe", "echo", data=blob)["data"] == blob
    arrays = {"f32": rng.standard_normal((3, 4, 5)).astype(numpy.float32),
              "i16": rng.integers(-32768, 32767, 10000, dtype=numpy.int16),
              "strided": numpy.arange(100.0)[::3], "empty": numpy.zeros((0, 3))}
    echoed = client.call("probe", "echo", data=None, **arrays)["extra"]
    for name, array in arrays.items():
        assert echoed[name].dtype == array.dtype and echoed[name].shape == array.shape
        assert numpy.array_equal(echoed[name], array)


def test_progress_reports_reach_the_callback(probe_host):
    seen = []
    probe_host.client().call("probe", "sleep", seconds=0.5, on_progress=seen.append)
    assert seen and all(p.stage == "sleeping" for p in seen)
    assert all(0.0 <= p.fraction <= 1.0 for p in seen)


def test_async_client_call_stream_and_task_cancellation(probe_host):
    import asyncio

    async def scenario():
        async with modelhost.AsyncClient(probe_host.endpoint) as client:
            sums = await asyncio.gather(*(client.call("probe", "add", a=i, b=1) for i in range(4)))
            chunks = [c["index"] async for c in client.stream("probe", "count", n=20)]
            task = asyncio.ensure_future(client.call("probe", "sleep", seconds=30))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after = await client.call("probe", "add", a=7, timeout=10)
            status = await client.ps()
            return sums, chunks, after, status

    sums, chunks, after, status = asyncio.run(scenario())
    assert sums == [1, 2, 3, 4]  # one runs, three queue (max_queue 3)
    assert chunks == list(range(20))
    # The cancelled sleep freed the daemon, so this call did not wait 30 s behind it.
    assert after == 7 and status["daemons"][0]["name"] == "probe"


def test_ctrl_c_in_the_command_line_cancels_the_remote_call(probe_host):
    call = subprocess.Popen([sys.executable, "-m", "modelhost.cli", "call", "--endpoint",
                             probe_host.endpoint, "probe", "sleep", "seconds=60"],
                            stderr=subprocess.PIPE)
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "busy", 10, "the call to start")
    call.send_signal(signal.SIGINT)
    assert call.wait(10) == 130
    probe_host.wait_for(lambda s: s["daemons"][0]["state"] == "ready", 5,
                        "the daemon to drop the cancelled call")


def test_a_daemon_whose_engine_cannot_load_shows_failed_with_the_reason(make_host):
    broken = daemon_yaml("broken").replace("probe_engine:ProbeEngine", "probe_engine:Missing")
    host = make_host([broken, daemon_yaml("probe")]).start()
    status = host.wait_for(lambda s: {d["name"]: d["state"] for d in s["daemons"]}
                           == {"broken": "failed", "probe": "ready"}, 30, "broken to fail")
    broken_row = next(d for d in status["daemons"] if d["name"] == "broken")
    assert "has no class Missing" in broken_row["last_error"]
    with pytest.raises(modelhost.DaemonUnavailable, match="has no class Missing"):
        host.client().call("broken", "info")
    assert host.client().call("probe", "add", a=1) == 1


def test_a_daemon_that_cannot_start_shows_its_output_and_is_retried(make_host):
    # /bin/sh is no Python: it cannot run `-m modelhost.daemons.run` and dies
    # before it can register.
    bad = "  bad:\n    engine: probe_engine:ProbeEngine\n    python: /bin/sh\n    venv: false\n"
    host = make_host([bad, daemon_yaml("probe")]).start()

    def bad_row(status):
        return next(d for d in status["daemons"] if d["name"] == "bad")

    status = host.wait_for(lambda s: bad_row(s)["state"] == "failed" and bad_row(s)["restarts"] >= 1,
                           30, "bad to fail and be retried")
    assert "before it became ready" in bad_row(status)["last_error"]
    assert "cannot open modelhost.daemons.run" in bad_row(status)["last_error"]  # its output
    with pytest.raises(modelhost.DaemonUnavailable, match="before it became ready"):
        host.client().call("bad", "info")
    assert host.client().call("probe", "add", a=1) == 1


def test_a_daemon_killed_right_after_it_became_ready_keeps_its_queue_for_the_restart(make_host):
    # The supervisor asks the broker twice a second which daemons are ready; a
    # process killed the moment ps shows it serving was most likely never seen
    # ready by it, and must still count as a crash, not a failed start.
    host = make_host([daemon_yaml("probe", max_queue=64,
                                  restart="{backoff_s: 0.1, max_backoff_s: 0.1}")]).start()
    host.wait_ready("probe")
    client = host.client()
    killed, sleeps, adds = [], [], []
    for round_ in range(5):
        # Queued while the daemon is (about to be) down: a sleep that holds the
        # next process's slot, and two calls behind it that must wait.
        sleeps.append(client.stream("probe", "sleep", seconds=60))
        adds += [(round_ * 10 + i, client.stream("probe", "add", a=round_ * 10, b=i))
                 for i in (1, 2)]
        deadline = time.monotonic() + 60
        while True:
            # The same client: the broker has its calls before it answers ps.
            row = client.ps()["daemons"][0]
            assert row["queued"] + row["running"] > 0 and row["state"] != "failed", \
                "the queued calls were answered, not kept for the restart: {}\n{}".format(
                    row, host.log()[-4000:])
            # Busy with two queued: the sleep runs and only this round's adds wait.
            if row["pid"] not in killed and row["state"] == "busy" and row["queued"] == 2:
                break
            assert time.monotonic() < deadline, "no new process served the sleep:\n" + host.log()
            time.sleep(0.01)
        os.kill(row["pid"], signal.SIGKILL)
        killed.append(row["pid"])
    for expected, stream in adds:
        assert list(stream) == [] and stream.result == expected
    for stream in sleeps:
        with pytest.raises(modelhost.DaemonCrashed):
            list(stream)
    row = host.wait_ready("probe")["daemons"][0]
    assert row["pid"] not in killed and killed[-1] in row["ready_pids"]


def test_killing_the_supervisor_leaves_no_orphans(make_host):
    host = make_host([daemon_yaml("probe")]).start()
    host.wait_ready("probe")
    status = host.ps()
    pids = [status["broker"]["pid"], status["daemons"][0]["pid"]]
    os.kill(host.process.pid, signal.SIGKILL)
    host.process.wait()
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(pid) for pid in pids)


def test_ctrl_c_stops_everything_cleanly(make_host):
    host = make_host([daemon_yaml("probe")]).start()
    host.wait_ready("probe")
    status = host.ps()
    pids = [status["broker"]["pid"], status["daemons"][0]["pid"]]
    host.process.send_signal(signal.SIGINT)
    assert host.process.wait(30) == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert "all stopped" in host.log()


def test_broker_refuses_a_bad_configuration(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemons:\n  x:\n    engine: a.b:C\n    python: 3.10\n    concurency: 2\n")
    result = subprocess.run([sys.executable, "-m", "modelhost.cli", "up", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bad.yaml:4" in result.stderr and "bad.yaml:5" in result.stderr
    assert "concurrency" in result.stderr  # the suggestion for the typo


def test_the_client_runs_on_python_37_with_pyzmq_and_msgpack(probe_host, test_venvs):
    script = ("import modelhost, sys\n"
              "c = modelhost.Client(sys.argv[1])\n"
              "s = c.stream('probe', 'count', n=3, size=2)\n"
              "print(sys.version_info[:2], c.call('probe', 'add', a=2, b=3), "
              "[x['blob'] for x in s], s.result)\n")
    python = str(test_venvs["py37"] / "bin" / "python")
    out = subprocess.run([python, "-c", script, probe_host.endpoint], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("(3, 7) 5 [b'\\x00\\x00', b'\\x01\\x01', b'\\x02\\x02'] "
                                  "{'sent': 3}")


def test_a_daemon_not_ready_within_its_window_is_killed_and_retried(make_host):
    slow = daemon_yaml("slow", ready_timeout_s=1, options="{load_seconds: 30}")
    host = make_host([slow]).start()

    def row(status):
        return status["daemons"][0]

    host.wait_for(lambda s: row(s)["restarts"] >= 1, 30, "the slow daemon to be restarted")
    assert "not ready after 1s" in host.log()
    assert row(host.ps())["state"] in ("starting", "loading", "failed")


def test_a_frame_over_the_hard_limit_is_dropped_and_the_caller_learns_it_was_lost(make_host):
    # Frames, which the cap is for: a payload in shared memory never reaches the
    # broker's socket (tests/test_shm.py has it counted against max_payload instead).
    host = make_host([daemon_yaml("probe")], {"max_payload": "1MiB",
                                              "shm": "{threshold: off}"}).start()
    host.wait_ready("probe")
    client = host.client(broker_timeout=30)
    # Over the broker's per-frame cap (max_payload + 1 MiB): ZeroMQ drops the
    # connection, no reply is possible, and the client's pings reveal the loss.
    with pytest.raises(modelhost.RequestLost, match="no record of request"):
        client.call("probe", "echo", data=b"\0" * (3 * 2**20), timeout=20)
    assert client.call("probe", "add", a=1) == 1
    # The cap is for what clients send: a daemon may answer with more.
    chunks = list(client.stream("probe", "count", n=2, size=3 * 2**20))
    assert [len(c["blob"]) for c in chunks] == [3 * 2**20] * 2


def test_a_second_up_on_the_same_endpoint_refuses_to_start(probe_host):
    second = subprocess.run(
        [sys.executable, "-m", "modelhost.cli", "up", "--config", str(probe_host.config),
         "--no-setup"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "another broker is already serving" in second.stderr
    assert probe_host.client().call("probe", "add", a=1) == 1


def test_an_idle_client_is_not_mistaken_for_one_whose_broker_died(probe_host):
    import asyncio

    client = probe_host.client(broker_timeout=1.0)
    time.sleep(1.5)  # idle for longer than its broker_timeout: nothing was asked
    assert client.call("probe", "add", a=1) == 1
    assert client.ps()["daemons"][0]["name"] == "probe"

    async def idle_then_call():
        async with modelhost.AsyncClient(probe_host.endpoint, broker_timeout=1.0) as aclient:
            assert await aclient.call("probe", "add", a=2) == 2
            await asyncio.sleep(1.5)
            return await aclient.call("probe", "add", a=3)

    assert asyncio.run(idle_then_call()) == 3


def test_ps_shows_each_daemons_measured_memory(probe_host):
    client = probe_host.client()
    before = probe_host.daemon("probe")["memory_bytes"]
    assert client.call("probe", "hold", megabytes=200) == 200 * 2**20
    grown = probe_host.wait_for(
        lambda s: s["daemons"][0]["memory_bytes"] >= before + 200 * 2**20, 10,
        "the daemon's resident memory to grow by 200 MiB")
    assert grown["memory"]["probe"] == "host"
    assert grown["memory"]["devices"][0]["name"] == "host"
    table = subprocess.run([sys.executable, "-m", "modelhost.cli", "ps", "--endpoint",
                            probe_host.endpoint], capture_output=True, text=True, timeout=30)
    assert "MEM" in table.stdout and "MiB" in table.stdout and "(probe: host)" in table.stdout
