"""Tests of the command line's memory verbs and `ps` rendering, and of the client
methods behind them against a scripted stand-in for the broker (no real broker:
the end-to-end tests are in the host tests)."""

import asyncio
import json
import threading
import time

import pytest
import zmq

import modelhost
from modelhost import _cli_status, _format, cli, protocol
from modelhost.errors import InsufficientMemory, RequestError, RequestLost, UnknownModel

GiB = 2**30
MiB = 2**20
H100 = 85520809984  # what NVML reports for an H100 80GB: 79.6 GiB


def daemon_row(**fields):
    row = {
        "name": "tts", "state": "ready", "tier": "resident", "device": "gpu0", "pinned": False,
        "pid": 4321, "python": "3.10.14", "uptime_s": 3600.0, "memory_bytes": int(2.1 * GiB),
        "footprint": {"declared": {"resident": 2 * GiB, "peak": 512 * MiB},
                      "measured": {"resident": int(2.3 * GiB), "peak": 640 * MiB,
                                   "offloaded": 300 * MiB, "unloaded": 280 * MiB}},
        "ttl_s": None, "idle_ttl_s": None, "tiers": ["resident", "offloaded", "unloaded", "stopped"],
        "evictions": 0, "queued": 0, "running": 0, "concurrency": 1, "max_queue": 64,
        "loads": 1, "restarts": 0, "last_error": None,
    }
    row.update(fields)
    return row


def gpu(index=0, **fields):
    device = {"id": "gpu{}".format(index), "name": "gpu{} (NVIDIA H100)".format(index),
              "total": H100, "used": int(41.2 * GiB), "free": H100 - int(41.2 * GiB),
              "threshold": int(0.9 * H100), "threshold_text": "90% of 79.6 GiB",
              "external": int(1.1 * GiB), "external_counted": True, "committed": 38 * GiB}
    device.update(fields)
    return device


def status(daemons, devices=None, probe="nvml", reason="NVML found 1 GPU"):
    return {
        "broker": {"pid": 99, "uptime_s": 300.0, "frontend": "ipc:///run/mh/frontend.sock"},
        "memory": {"probe": probe, "reason": reason,
                   "devices": [gpu()] if devices is None else devices},
        "daemons": daemons,
    }


# --- ps: the memory picture ---------------------------------------------------------

def test_ps_renders_devices_and_the_memory_columns():
    text = _cli_status.render_status(status([
        daemon_row(name="cosyvoice", state="busy", pinned=True, running=1, queued=2),
        daemon_row(name="talkinggaussian", state="offloaded", tier="offloaded", pid=2345,
                   python="3.7.17", memory_bytes=310 * MiB, ttl_s=250.4, idle_ttl_s=600.0,
                   footprint={"declared": {"resident": None, "peak": None},
                              "measured": {"resident": int(12.3 * GiB), "peak": None}},
                   restarts=1, last_error="CUDA out of memory\nTraceback ..."),
        daemon_row(name="tangoflux", state="stopped", tier="stopped", device=None, pid=None,
                   python=None, uptime_s=None, memory_bytes=None, idle_ttl_s=600.0,
                   footprint={"declared": {"resident": 6 * GiB, "peak": 2 * GiB},
                              "measured": {"resident": None, "peak": None}}),
    ]))
    assert text.splitlines() == [
        "broker pid 99 up 5m, clients at ipc:///run/mh/frontend.sock",
        "memory (probe: nvml): NVML found 1 GPU",
        "  gpu0 (NVIDIA H100): used 41.2 / 79.6 GiB, committed 38.0 GiB of threshold 71.7 GiB "
        "(90% of 79.6 GiB), external 1.1 GiB",
        "NAME             STATE      TIER       PID   PYTHON   MEM        RESIDENT   PEAK       "
        "TTL     RUN  QUEUE  LAST ERROR",
        "cosyvoice        busy       resident   4321  3.10.14  2.1 GiB    2.0G/2.3G  512M/640M  "
        "pinned  1/1  2/64",
        "talkinggaussian  offloaded  offloaded  2345  3.7.17   310.0 MiB  -/12G      -          "
        "4m10s   0/1  0/64   CUDA out of memory",
        "tangoflux        stopped    stopped    -     -        -          6.0G/-     2.0G/-     "
        "-       0/1  0/64",
    ]


def test_a_long_device_line_wraps():
    device = gpu(name="gpu0 (NVIDIA H100 80GB HBM3)", external_counted=False)
    assert _cli_status.device_line(device) == (
        "gpu0 (NVIDIA H100 80GB HBM3): used 41.2 / 79.6 GiB, committed 38.0 GiB of threshold "
        "71.7 GiB (90% of 79.6 GiB),\n    external 1.1 GiB (not counted)")
    lines = _cli_status.render_status(status([daemon_row()], devices=[device])).splitlines()
    assert lines[2:4] == ["  " + line for line in _cli_status.device_line(device, 118).splitlines()]
    assert all(len(line) <= _cli_status.TABLE_WIDTH for line in lines)


def test_ps_table_fits_in_120_columns_without_an_error():
    row = daemon_row(name="talkinggaussian", state="offloading", tier="offloaded", pid=4194304,
                     python="3.10.14", memory_bytes=int(12.3 * GiB), ttl_s=3599,
                     footprint={"declared": {"resident": 12 * GiB, "peak": 4 * GiB},
                                "measured": {"resident": int(12.3 * GiB),
                                             "peak": int(4.5 * GiB)}},
                     queued=12, running=1, restarts=10)
    text = _cli_status.render_status(status([row]))
    assert max(len(line) for line in text.splitlines()) <= _cli_status.TABLE_WIDTH


def test_ps_wide_shows_every_column():
    text = _cli_status.render_status(status([daemon_row(evictions=3, loads=4)]), wide=True)
    header, row = text.splitlines()[-2:]
    assert header.split("  ")[0] == "NAME"
    for column in ("DEV", "UPTIME", "LOADS", "EVICTIONS", "RESTARTS"):
        assert column in header
    assert "RESTARTS" in header
    assert "RESTARTS" not in _cli_status.render_status(status([daemon_row()]))
    assert row.split() == ["tts", "ready", "resident", "gpu0", "4321", "3.10.14", "60m", "2.1",
                           "GiB", "2.0G/2.3G", "512M/640M", "-", "0/1", "0/64", "4", "3", "0"]


def test_ps_shows_the_device_column_when_there_are_several():
    one = _cli_status.render_status(status([daemon_row()]))
    assert "DEV" not in one
    two = _cli_status.render_status(status([daemon_row(), daemon_row(name="b", device="gpu1")],
                                   devices=[gpu(0), gpu(1)]))
    assert "gpu1 (NVIDIA H100): used" in two
    header, first, second = two.splitlines()[-3:]
    assert header.split()[:4] == ["NAME", "STATE", "TIER", "DEV"]
    assert first.split()[3] == "gpu0" and second.split()[3] == "gpu1"


@pytest.mark.parametrize("row, ttl", [
    (daemon_row(pinned=True, ttl_s=None), "pinned"),
    (daemon_row(ttl_s=None, idle_ttl_s=600.0), "-"),
    (daemon_row(ttl_s=42.9, idle_ttl_s=600.0), "42s"),
    (daemon_row(ttl_s=250.4, idle_ttl_s=600.0), "4m10s"),
    (daemon_row(ttl_s=7500.0, idle_ttl_s=9000.0), "2h05m"),
    (daemon_row(ttl_s=-1.0, idle_ttl_s=60.0), "0s"),
])
def test_ttl_column(row, ttl):
    assert _cli_status._ttl(row) == ttl


@pytest.mark.parametrize("footprint, resident, peak", [
    ({"declared": {"resident": 2 * GiB, "peak": 512 * MiB},
      "measured": {"resident": int(2.3 * GiB), "peak": 640 * MiB}}, "2.0G/2.3G", "512M/640M"),
    ({"declared": {"resident": None, "peak": 0},
      "measured": {"resident": 900 * 2**10, "peak": None}}, "-/900K", "0B/-"),
    ({"declared": {"resident": 12 * GiB, "peak": int(9.96 * GiB)},
      "measured": {"resident": int(12.6 * GiB), "peak": 1023 * MiB}}, "12G/13G", "10.0G/1023M"),
    ({"declared": {}, "measured": {}}, "-", "-"),
    (None, "-", "-"),
])
def test_footprint_columns(footprint, resident, peak):
    row = daemon_row(footprint=footprint)
    assert (_format.footprint(row, "resident"), _format.footprint(row, "peak")) == (resident, peak)


@pytest.mark.parametrize("device, line", [
    (gpu(), "gpu0 (NVIDIA H100): used 41.2 / 79.6 GiB, committed 38.0 GiB of threshold 71.7 GiB "
            "(90% of 79.6 GiB), external 1.1 GiB"),
    (gpu(name="gpu0 (NVIDIA A10)", total=24 * GiB, used=3 * GiB, threshold=20 * GiB,
         threshold_text="20.0 GiB", committed=2 * GiB, external=0, external_counted=False),
     "gpu0 (NVIDIA A10): used 3.0 / 24.0 GiB, committed 2.0 GiB of threshold 20.0 GiB, "
     "external 0 B (not counted)"),
    ({"id": "host", "name": "host", "total": 16 * GiB, "used": 700 * MiB, "free": 15 * GiB,
      "threshold": 2 * GiB, "threshold_text": "2.0 GiB", "committed": 300 * MiB,
      "external": 400 * MiB, "external_counted": True},
     "host: used 0.7 / 16.0 GiB, committed 300.0 MiB of threshold 2.0 GiB, external 400.0 MiB"),
    # A probe that names devices by their model only gets the id in front.
    ({"id": "gpu1", "name": "Tesla T4", "total": 15 * GiB, "used": 512 * MiB,
      "free": 14 * GiB}, "gpu1 (Tesla T4): used 0.5 / 15.0 GiB, free 14.0 GiB"),
    # An older broker: no id, no threshold, no committed figure.
    ({"name": "host", "total": 8 * GiB, "used": 3 * GiB, "free": 5 * GiB},
     "host: used 3.0 / 8.0 GiB, free 5.0 GiB"),
    ({"name": "tiny", "total": 900, "used": 100}, "tiny: used 100 / 900 B"),
])
def test_device_line(device, line):
    assert _cli_status.device_line(device) == line


def test_ps_of_an_older_broker_without_memory_fields():
    text = _cli_status.render_status({
        "broker": {"pid": 7, "uptime_s": 10.0, "frontend": "ipc:///x"},
        "memory": {"probe": "host", "devices": [
            {"name": "host", "total": 8 * GiB, "used": 3 * GiB, "free": 5 * GiB}]},
        "daemons": [{"name": "espeak", "state": "ready", "pid": 12, "python": "3.12.4",
                     "uptime_s": 10.0, "memory_bytes": 40 * MiB, "queued": 0, "running": 0,
                     "concurrency": 1, "max_queue": 64, "loads": 1, "restarts": 0,
                     "last_error": None}],
    })
    assert text.splitlines() == [
        "broker pid 7 up 10s, clients at ipc:///x",
        "memory (probe: host)",
        "  host: used 3.0 / 8.0 GiB, free 5.0 GiB",
        "NAME    STATE  TIER  PID  PYTHON  MEM       RESIDENT  PEAK  TTL  RUN  QUEUE  LAST ERROR",
        "espeak  ready  -     12   3.12.4  40.0 MiB  -         -     -    0/1  0/64",
    ]
    # Even less: no memory section at all, and no daemons.
    assert _cli_status.render_status({"broker": {}, "daemons": []}).splitlines() == [
        "broker pid ? up -, clients at ?", "no daemons configured"]


# --- the memory verbs: arguments ----------------------------------------------------

def test_parse_load():
    args = cli.build_parser().parse_args(["load", "tts"])
    assert (args.command, args.name, args.timeout, args.priority, args.json) == (
        "load", "tts", None, "normal", False)
    assert args.handler is _cli_status.cmd_memory_op
    args = cli.build_parser().parse_args(["load", "tts", "--timeout", "90", "--priority",
                                          "interactive", "--json", "--endpoint", "ipc:///e"])
    assert (args.timeout, args.priority, args.json, args.endpoint) == (
        90.0, "interactive", True, "ipc:///e")


def test_parse_unload_pin_unpin():
    parser = cli.build_parser()
    args = parser.parse_args(["unload", "tts", "--timeout", "5"])
    assert (args.command, args.name, args.timeout) == ("unload", "tts", 5.0)
    assert parser.parse_args(["unload", "tts"]).timeout is None
    for verb in ("pin", "unpin"):
        args = parser.parse_args([verb, "tts", "--json"])
        assert (args.command, args.name, args.json, args.handler) == (
            verb, "tts", True, _cli_status.cmd_memory_op)


@pytest.mark.parametrize("argv", [
    ["load"], ["load", "tts", "--priority", "urgent"], ["load", "tts", "--timeout", "soon"],
    ["pin"], ["pin", "tts", "--timeout", "5"], ["unpin", "a", "b"], ["unload", "tts", "--priority",
                                                                     "batch"],
])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2


def test_ps_wide_flag():
    assert cli.build_parser().parse_args(["ps", "-w"]).wide is True
    assert cli.build_parser().parse_args(["ps"]).wide is False


# --- the memory verbs: what they print (a stand-in Client) ----------------------------

class FakeClient(object):
    """Records the client method called; answers with `answer` or raises it."""

    calls = []
    answer = None

    def __init__(self, endpoint=None, **options):
        self.endpoint = endpoint

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def _reply(self, *call):
        FakeClient.calls.append(call)
        if isinstance(FakeClient.answer, Exception):
            raise FakeClient.answer
        return FakeClient.answer

    def load(self, name, timeout=None, priority="normal"):
        return self._reply("load", name, timeout, priority)

    def unload(self, name, timeout=None):
        return self._reply("unload", name, timeout)

    def pin(self, name):
        return self._reply("pin", name)

    def unpin(self, name):
        return self._reply("unpin", name)


@pytest.fixture
def fake_client(monkeypatch):
    monkeypatch.setattr(_cli_status, "Client", FakeClient)
    FakeClient.calls = []
    FakeClient.answer = daemon_row()
    return FakeClient


def test_load_prints_where_the_daemon_is(fake_client, capsys):
    assert cli.main(["load", "tts", "--timeout", "60", "--priority", "batch",
                     "--endpoint", "ipc:///e"]) == 0
    assert fake_client.calls == [("load", "tts", 60.0, "batch")]
    out = capsys.readouterr().out
    assert out.startswith("tts: resident on gpu0, 2.1 GiB (loaded in ")
    assert out.endswith("s)\n") and len(out.splitlines()) == 1


def test_unload_pin_unpin_lines(fake_client, capsys):
    fake_client.answer = daemon_row(tier="unloaded", state="unloaded", memory_bytes=280 * MiB)
    assert cli.main(["unload", "tts", "--endpoint", "ipc:///e"]) == 0
    assert capsys.readouterr().out.startswith("tts: unloaded on gpu0, 280.0 MiB (unloaded in ")
    fake_client.answer = daemon_row(pinned=True)
    assert cli.main(["pin", "tts", "--endpoint", "ipc:///e"]) == 0
    assert capsys.readouterr().out == "tts: pinned, resident on gpu0, 2.1 GiB\n"
    fake_client.answer = daemon_row(idle_ttl_s=600.0)
    assert cli.main(["unpin", "tts", "--endpoint", "ipc:///e"]) == 0
    assert capsys.readouterr().out == (
        "tts: unpinned, resident on gpu0, 2.1 GiB, unloads after 10m00s idle\n")
    assert fake_client.calls == [("unload", "tts", None), ("pin", "tts"), ("unpin", "tts")]


def test_memory_op_line_with_few_fields():
    assert _cli_status.memory_op_line("load", "tts", {}, 0.04) == "tts: ? (loaded in 0.0s)"
    assert _cli_status.memory_op_line("unload", "tts", {"tier": "stopped"}, 1.25) == (
        "tts: stopped (unloaded in 1.2s)")
    assert _cli_status.memory_op_line("pin", "tts", {"state": "starting"}) == \
        "tts: pinned, starting"


def test_memory_verb_json_prints_the_row(fake_client, capsys):
    assert cli.main(["load", "tts", "--json", "--endpoint", "ipc:///e"]) == 0
    assert json.loads(capsys.readouterr().out) == daemon_row()


@pytest.mark.parametrize("error", [
    InsufficientMemory("tts needs 90.0 GiB, more than gpu0's threshold of 71.7 GiB "
                       "(90% of 79.6 GiB) even with every other daemon evicted"),
    UnknownModel("no model named 'tts'; this broker serves: espeak"),
])
def test_memory_verb_errors_exit_non_zero(fake_client, capsys, error):
    fake_client.answer = error
    assert cli.main(["load", "tts", "--endpoint", "ipc:///e"]) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "modelhost: [{}] {}\n".format(error.code, error.message)


def test_insufficient_memory_is_a_request_error_with_its_wire_code():
    error = modelhost.errors.error_from_wire("insufficient_memory", "never fits", {"need": 1})
    assert type(error) is InsufficientMemory and isinstance(error, RequestError)
    assert error.code == "insufficient_memory" and error.details == {"need": 1}
    assert modelhost.InsufficientMemory is InsufficientMemory
    assert "InsufficientMemory" in modelhost.__all__


# --- the client methods, against a scripted broker --------------------------------------

class ScriptedBroker(object):
    """A ROUTER that answers pings like the broker and each request as `script` says.

    script(header) returns the reply headers to send for it (an empty list:
    keep it pending). Every header received is kept in `.received`.
    """

    def __init__(self, endpoint, script, settled=True, remember=True):
        self.endpoint = endpoint
        self.script = script
        self.settled = settled
        self.remember = remember  # False: a broker that forgets pending requests at once
        self.received = []
        self.pending = set()  # ids the broker "knows", for pongs
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        context = zmq.Context.instance()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not socket.poll(50):
                    continue
                frames = socket.recv_multipart()
                client, (header, _) = frames[0], protocol.decode(frames[1:])
                self.received.append(header)
                if header["op"] == protocol.PING:
                    reply = {"kind": protocol.PONG, "id": header["id"], "settled": self.settled,
                             "known": [i for i in header.get("ids", []) if i in self.pending]}
                    socket.send_multipart([client] + protocol.encode(reply))
                    continue
                if header["op"] == protocol.CANCEL:
                    self.pending.discard(header["id"])
                    continue
                replies = self.script(header)
                if not replies and self.remember:
                    self.pending.add(header["id"])
                for reply in replies:
                    socket.send_multipart([client] + protocol.encode(reply))
        finally:
            socket.close(0)

    def ops(self):
        return [h for h in self.received if h["op"] not in (protocol.PING, protocol.CANCEL)]


def answer_with_row(header):
    if header["model"] != "tts":
        return [protocol.error_header(header["id"], UnknownModel("no model named {!r}"
                                                                 .format(header["model"])))]
    if header.get("priority") == "batch":
        return [protocol.error_header(header["id"], InsufficientMemory("never fits"))]
    tier = "unloaded" if header["op"] == protocol.UNLOAD else "resident"
    return [{"kind": protocol.PROGRESS, "id": header["id"], "fraction": 0.5},
            {"kind": protocol.RESULT, "id": header["id"],
             "value": daemon_row(tier=tier, pinned=header["op"] == protocol.PIN)}]


@pytest.fixture
def endpoint(tmp_path):
    return "ipc://{}/broker.sock".format(tmp_path)


def test_client_memory_ops_send_their_ops_and_return_the_row(endpoint):
    with ScriptedBroker(endpoint, answer_with_row) as broker, \
            modelhost.Client(endpoint) as client:
        assert client.load("tts", timeout=30, priority="interactive")["tier"] == "resident"
        assert client.load("tts") == daemon_row()
        assert client.unload("tts", timeout=5)["tier"] == "unloaded"
        assert client.unload("tts")["tier"] == "unloaded"
        assert client.pin("tts")["pinned"] is True
        assert client.unpin("tts")["pinned"] is False
        with pytest.raises(UnknownModel):
            client.load("nope")
        with pytest.raises(InsufficientMemory, match="never fits"):
            client.load("tts", priority="batch")
    sent = [{k: v for k, v in h.items() if k != "v"} for h in broker.ops()]
    assert sent == [
        {"op": "load", "id": 1, "model": "tts", "priority": "interactive", "timeout": 30.0},
        {"op": "load", "id": 2, "model": "tts", "priority": "normal"},
        {"op": "unload", "id": 3, "model": "tts", "timeout": 5.0},
        {"op": "unload", "id": 4, "model": "tts"},
        {"op": "pin", "id": 5, "model": "tts"},
        {"op": "unpin", "id": 6, "model": "tts"},
        {"op": "load", "id": 7, "model": "nope", "priority": "normal"},
        {"op": "load", "id": 8, "model": "tts", "priority": "batch"},
    ]


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_long_load_is_pinged_and_a_lost_one_raises_request_lost(endpoint):
    """A load waits as long as the broker knows it; one the broker has forgotten (it
    restarted) comes back as request_lost, as a call would."""
    with ScriptedBroker(endpoint, lambda header: []) as broker, \
            modelhost.Client(endpoint) as client:
        threading.Timer(2.5, lambda: broker.pending.discard(1)).start()
        started = time.monotonic()
        with pytest.raises(RequestLost):
            client.load("tts")
        assert time.monotonic() - started >= 2.5
    pings = [h for h in broker.received if h["op"] == protocol.PING]
    assert len(pings) >= 3 and all(h["ids"] == [1] for h in pings)


def test_a_load_timeout_cancels_it(endpoint):
    with ScriptedBroker(endpoint, lambda header: []) as broker, \
            modelhost.Client(endpoint) as client:
        with pytest.raises(modelhost.Timeout, match="asked to cancel the request"):
            client.load("tts", timeout=0.2)
        wait_until(lambda: any(h["op"] == protocol.CANCEL for h in broker.received))
    cancel, = [h for h in broker.received if h["op"] == protocol.CANCEL]
    assert cancel["id"] == 1
    assert broker.ops()[0]["timeout"] == 0.2


def test_async_client_memory_ops(endpoint):
    async def scenario():
        async with modelhost.AsyncClient(endpoint) as client:
            rows = await asyncio.gather(client.load("tts", timeout=30, priority="batch"),
                                        client.unload("tts"), client.pin("tts"),
                                        client.unpin("tts"), return_exceptions=True)
            with pytest.raises(UnknownModel):
                await client.load("nope")
            return rows

    with ScriptedBroker(endpoint, answer_with_row) as broker:
        loaded, unloaded, pinned, unpinned = asyncio.run(scenario())
    assert isinstance(loaded, InsufficientMemory)
    assert unloaded["tier"] == "unloaded"
    assert pinned["pinned"] is True and unpinned["pinned"] is False
    sent = sorted(({k: v for k, v in h.items() if k != "v"} for h in broker.ops()),
                  key=lambda h: h["id"])
    assert sent == [
        {"op": "load", "id": 1, "model": "tts", "priority": "batch", "timeout": 30.0},
        {"op": "unload", "id": 2, "model": "tts"},
        {"op": "pin", "id": 3, "model": "tts"},
        {"op": "unpin", "id": 4, "model": "tts"},
        {"op": "load", "id": 5, "model": "nope", "priority": "normal"},
    ]


def test_async_load_lost_by_the_broker_raises_request_lost(endpoint):
    async def scenario():
        async with modelhost.AsyncClient(endpoint) as client:
            await client.load("tts")

    with ScriptedBroker(endpoint, lambda header: [], remember=False):
        with pytest.raises(RequestLost):
            asyncio.run(asyncio.wait_for(scenario(), 10))
