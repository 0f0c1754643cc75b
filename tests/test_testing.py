"""modelhost.testing.FakeBroker: the real Client and AsyncClient against plain functions.

Each test starts a FakeBroker (a ROUTER on a private ipc socket, in a thread) and
talks to it with the real clients, or with a bare DEALER where the test is about
the wire itself (exactly one terminal reply, pings, malformed frames).
"""

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest
import zmq

import modelhost
from modelhost import protocol
from modelhost.daemons.engine import Engine, operation
from modelhost.testing import FakeBroker, RecordedCall

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # how long a test waits for something that happens at once (a bound)


def echo(text, times=1):
    return {"text": text * times}


def count(ctx, n):
    for index in range(n):
        ctx.progress(index / n, "counting", "at {}".format(index))
        yield index
    return "counted {}".format(n)


@pytest.fixture
def broker():
    with FakeBroker({"espeak": {"echo": echo, "count": count}}) as fake:
        yield fake


class Wire(object):
    """A bare DEALER on the fake broker: frames in, (header, payloads) out."""

    def __init__(self, endpoint):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)

    def send(self, header, payloads=()):
        protocol.send(self.socket, protocol.encode(header, payloads))

    def receive(self):
        assert self.socket.poll(WAIT_S * 1000), "no reply from the fake broker"
        return protocol.decode(protocol.recv(self.socket))

    def close(self):
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def wire(broker):
    dealer = Wire(broker.endpoint)
    yield dealer
    dealer.close()


# --- the blocking client ------------------------------------------------------------------


def test_a_call_returns_the_handlers_result_and_is_recorded(broker):
    with broker.client() as client:
        assert client.call("espeak", "echo", text="ab", times=2,
                           priority=protocol.Priority.BATCH, timeout=30) == {"text": "abab"}
    [call] = broker.calls
    assert isinstance(call, RecordedCall)
    assert (call.model, call.method, call.args, call.priority, call.timeout, call.stream) == (
        "espeak", "echo", {"text": "ab", "times": 2}, "batch", 30.0, False)


def test_bytes_and_arrays_travel_as_frames_both_ways():
    def mirror(audio, samples):
        return {"audio": audio, "samples": samples * 2}

    samples = numpy.arange(6, dtype=numpy.float32).reshape(3, 2)
    with FakeBroker({"m": {"mirror": mirror}}) as broker, broker.client() as client:
        result = client.call("m", "mirror", audio=b"\x00\xff" * 1000, samples=samples)
    assert result["audio"] == b"\x00\xff" * 1000
    assert result["samples"].dtype == numpy.float32
    assert result["samples"].tolist() == (samples * 2).tolist()
    args = broker.calls[0].args
    assert args["audio"] == b"\x00\xff" * 1000 and args["samples"].tolist() == samples.tolist()


def test_a_generator_streams_its_chunks_with_progress_then_its_result(broker):
    seen = []
    with broker.client() as client:
        stream = client.stream("espeak", "count", n=3, on_progress=seen.append)
        assert list(stream) == [0, 1, 2]
        assert stream.result == "counted 3"
        # call() on a streaming operation keeps the result, drops the chunks.
        assert client.call("espeak", "count", n=2) == "counted 2"
    assert [(p.fraction, p.stage, p.message) for p in seen] == [
        (0.0, "counting", "at 0"), (1 / 3, "counting", "at 1"), (2 / 3, "counting", "at 2")]
    assert [call.stream for call in broker.calls] == [True, False]


def test_an_engines_operation_is_a_handler():
    class Shouter(Engine):
        @operation
        def shout(self, ctx, text: str):
            ctx.progress(0.5, "shouting")
            return text.upper()

    seen = []
    with FakeBroker({"shouter": {"shout": Shouter().shout}}) as broker:
        with broker.client() as client:
            assert client.call("shouter", "shout", text="hi", on_progress=seen.append) == "HI"
    assert [(p.fraction, p.stage) for p in seen] == [(0.5, "shouting")]


def test_unknown_models_methods_and_arguments_are_typed_errors(broker):
    with broker.client() as client:
        with pytest.raises(modelhost.UnknownModel, match="no model named 'nope'; this broker "
                                                         "serves: espeak"):
            client.call("nope", "echo", text="x")
        with pytest.raises(modelhost.UnknownMethod, match="offers: count, echo"):
            client.call("espeak", "sing", text="x")
        with pytest.raises(modelhost.BadArguments, match="missing a required argument: 'text'"):
            client.call("espeak", "echo")
        with pytest.raises(modelhost.BadArguments, match="unexpected keyword argument 'loud'"):
            client.call("espeak", "echo", text="x", loud=True)
    # Recorded as received, refused or not.
    assert [(call.model, call.method) for call in broker.calls] == [
        ("nope", "echo"), ("espeak", "sing"), ("espeak", "echo"), ("espeak", "echo")]


def test_what_a_handler_raises_reaches_the_client_typed():
    def unavailable():
        raise modelhost.DaemonUnavailable("espeak is failed: no voice data",
                                          {"daemon": "espeak"})

    def buggy():
        return {}["missing"]

    def half_stream():
        yield 1
        raise modelhost.BadArguments("no second chunk")

    handlers = {"m": {"unavailable": unavailable, "buggy": buggy, "half": half_stream}}
    with FakeBroker(handlers) as broker, broker.client() as client:
        with pytest.raises(modelhost.DaemonUnavailable) as raised:
            client.call("m", "unavailable")
        assert raised.value.message == "espeak is failed: no voice data"
        assert raised.value.details == {"daemon": "espeak"}
        with pytest.raises(modelhost.EngineError, match="buggy raised KeyError") as raised:
            client.call("m", "buggy")
        assert raised.value.details == {"type": "KeyError"}
        stream = client.stream("m", "half")
        assert next(stream) == 1
        with pytest.raises(modelhost.BadArguments, match="no second chunk"):
            next(stream)
        # The broker serves on after each of them.
        with pytest.raises(modelhost.UnknownModel):
            client.call("other", "x")


def test_a_cancelled_stream_ends_with_cancelled(broker):
    held = threading.Event()

    def forever(ctx):
        yield "first"
        held.set()
        ctx.wait_cancelled(WAIT_S)
        while True:  # stopped by the fake at its next chunk, as by the daemon runtime
            yield "after the cancel"

    broker.handlers["slow"] = {"forever": forever}
    with broker.client() as client:
        stream = client.stream("slow", "forever")
        assert next(stream) == "first"
        assert held.wait(WAIT_S)
        stream.cancel()
        with pytest.raises(modelhost.Cancelled):
            for chunk in stream:
                assert chunk == "after the cancel"  # the one sent before the stop
        assert broker.cancels == [stream.request_id]
        assert client.call("espeak", "echo", text="still") == {"text": "still"}


def test_a_plain_handler_sees_the_cancel_and_its_raise_ends_the_call(broker):
    started = threading.Event()
    saw = []

    def wait(ctx):
        started.set()
        saw.append(ctx.wait_cancelled(WAIT_S))
        ctx.check_cancelled()  # raises Cancelled: the call's terminal reply

    broker.handlers["slow"] = {"wait": wait}
    with broker.client() as client:
        stream = client.stream("slow", "wait")
        assert started.wait(WAIT_S)
        stream.cancel()
        with pytest.raises(modelhost.Cancelled):
            list(stream)
    assert saw == [True]


def test_a_timeout_is_answered_and_the_handler_told_to_stop(broker):
    saw = []
    done = threading.Event()

    def stuck(ctx):
        saw.append(ctx.wait_cancelled(WAIT_S))
        done.set()

    broker.handlers["slow"] = {"stuck": stuck}
    with broker.client() as client:
        with pytest.raises(modelhost.Timeout, match="did not finish within its timeout"):
            client.call("slow", "stuck", timeout=0.2)
    assert done.wait(WAIT_S) and saw == [True]


def test_calls_run_concurrently(broker):
    both = threading.Barrier(2, timeout=WAIT_S)
    broker.handlers["pair"] = {"meet": lambda: both.wait() is not None}
    results = []

    def call():
        with broker.client() as client:
            results.append(client.call("pair", "meet"))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert results == [True, True]


def test_a_long_call_stays_alive_through_the_clients_pings():
    # Longer than broker_timeout: without pongs the client would give up with
    # BrokerUnavailable.
    def slow():
        time.sleep(4.5)
        return "late but fine"

    with FakeBroker({"m": {"slow": slow}}) as broker:
        with broker.client(broker_timeout=3.0) as client:
            assert client.call("m", "slow") == "late but fine"


def test_ps_load_unload_pin_and_unpin(broker):
    with broker.client() as client:
        status = client.ps()
        assert status["broker"]["protocol"] == protocol.VERSION
        [row] = status["daemons"]
        assert (row["name"], row["state"], row["tier"], row["methods"], row["pinned"]) == (
            "espeak", "ready", "resident", ["count", "echo"], False)
        assert client.unload("espeak")["state"] == "unloaded"
        assert client.load("espeak")["tier"] == "resident"
        assert client.pin("espeak")["pinned"] is True
        assert client.ps()["daemons"][0]["pinned"] is True
        assert client.unpin("espeak")["pinned"] is False
        with pytest.raises(modelhost.UnknownModel):
            client.load("nope")
        # The fake has no event stream, and says so.
        with pytest.raises(modelhost.BrokerUnavailable, match="publishes no events"):
            client.events()


def test_a_tcp_endpoint():
    with FakeBroker({"m": {"echo": echo}}, endpoint="tcp://127.0.0.1:*") as broker:
        assert re.match(r"tcp://127\.0\.0\.1:\d+$", broker.endpoint)
        with modelhost.Client(broker.endpoint) as client:
            assert client.call("m", "echo", text="t") == {"text": "t"}


def test_close_cancels_running_handlers():
    started, saw = threading.Event(), []

    def wait(ctx):
        started.set()
        saw.append(ctx.wait_cancelled(WAIT_S))

    broker = FakeBroker({"m": {"wait": wait}})
    wire = Wire(broker.endpoint)
    try:
        wire.send({"op": protocol.CALL, "id": 1, "model": "m", "method": "wait"})
        assert started.wait(WAIT_S)
        broker.close()
        assert saw == [True]
        broker.close()  # twice is harmless
    finally:
        wire.close()


def test_handlers_of_the_wrong_shape_get_internal_and_serving_goes_on(broker):
    broker.handlers["flat"] = echo  # not {method: handler}
    with broker.client() as client:
        with pytest.raises(modelhost.InternalError, match="fake broker failed"):
            client.call("flat", "echo", text="x")
        assert client.call("espeak", "echo", text="y") == {"text": "y"}


# --- the asyncio client -------------------------------------------------------------------


def test_the_async_client(broker):
    async def main():
        async with broker.async_client() as client:
            assert await client.call("espeak", "echo", text="a") == {"text": "a"}
            assert [chunk async for chunk in client.stream("espeak", "count", n=2)] == [0, 1]
            with pytest.raises(modelhost.UnknownModel):
                await client.call("nope", "x")
            return (await client.ps())["daemons"][0]["name"]

    assert asyncio.run(main()) == "espeak"


def test_cancelling_the_async_task_cancels_the_handler(broker):
    started, finished, saw = threading.Event(), threading.Event(), []

    def wait(ctx):
        started.set()
        saw.append(ctx.wait_cancelled(WAIT_S))
        finished.set()
        return "too late"

    broker.handlers["slow"] = {"wait": wait}

    async def main():
        loop = asyncio.get_running_loop()
        async with broker.async_client() as client:
            task = asyncio.ensure_future(client.call("slow", "wait"))
            assert await loop.run_in_executor(None, started.wait, WAIT_S)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await loop.run_in_executor(None, finished.wait, WAIT_S)

    asyncio.run(main())
    assert saw == [True]
    assert broker.cancels == [broker.calls[0].id]


# --- the wire -----------------------------------------------------------------------------


def test_a_late_result_after_a_timeout_is_never_sent(broker, wire):
    returned = threading.Event()

    def late(ctx):
        ctx.wait_cancelled(WAIT_S)
        return "after the timeout"  # the handler ignores the cancel and answers anyway

    def run(ctx):
        try:
            return late(ctx)
        finally:
            returned.set()

    broker.handlers["slow"] = {"late": run}
    wire.send({"op": protocol.CALL, "id": 7, "model": "slow", "method": "late", "timeout": 0.1})
    header, _ = wire.receive()
    assert (header["kind"], header["id"], header["code"]) == ("error", 7, "timeout")
    assert returned.wait(WAIT_S)
    # The result was handed over before this ping arrived, so it would come first.
    wire.send({"op": protocol.PING, "id": "p", "ids": [7]})
    header, _ = wire.receive()
    assert (header["kind"], header["id"], header["known"]) == ("pong", "p", [])


def test_a_ping_names_the_requests_still_running(broker, wire):
    release = threading.Event()
    broker.handlers["slow"] = {"hold": lambda: release.wait(WAIT_S)}
    wire.send({"op": protocol.CALL, "id": 1, "model": "slow", "method": "hold"})
    wire.send({"op": protocol.PING, "id": "p1", "ids": [1, 2]})
    header, _ = wire.receive()
    assert (header["kind"], header["known"], header["settled"]) == ("pong", [1], True)
    release.set()
    header, _ = wire.receive()
    assert (header["kind"], header["id"], header["value"]) == ("result", 1, True)


def test_a_reused_id_and_a_malformed_message_get_bad_message(broker, wire):
    release = threading.Event()
    broker.handlers["slow"] = {"hold": lambda: release.wait(WAIT_S)}
    call = {"op": protocol.CALL, "id": 1, "model": "slow", "method": "hold"}
    wire.send(call)
    wire.send(call)
    header, _ = wire.receive()
    assert (header["kind"], header["id"], header["code"]) == ("error", 1, "bad_message")
    assert "already in use" in header["message"]
    release.set()
    assert wire.receive()[0]["kind"] == "result"
    wire.send({"op": protocol.CALL, "id": 2, "model": "slow"})  # no method
    header, _ = wire.receive()
    assert (header["kind"], header["id"], header["code"]) == ("error", 2, "bad_message")
    protocol.send(wire.socket, [b"\xc1 not msgpack"])
    assert wire.receive()[0]["code"] == "bad_message"



# --- the README ---------------------------------------------------------------------------


def readme_example():
    """The first Python block of the README's "Testing your own programs" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Testing your own programs\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path):
    out = subprocess.run([sys.executable, "-c", readme_example()], cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert out.returncode == 0, out.stdout.decode()

