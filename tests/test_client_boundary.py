"""The client's surface: options keyword-only, one "not set" sentinel, and ZeroMQ and
msgpack failures raised as modelhost errors (from the original exception), against
stand-ins for the broker (no real broker here)."""

import asyncio
import inspect
import shutil
import tempfile
import threading

import msgpack
import pytest
import zmq
import zmq.asyncio

import modelhost
from modelhost import _messages, cli, protocol
from modelhost.errors import BadMessage, ProtocolMismatch, TransportError

# What stays positional: what each call is about. Everything else is an option.
POSITIONAL = {
    "__init__": ["endpoint"],
    "call": ["model", "method"], "stream": ["model", "method"], "ps": [], "events": [],
    "load": ["name"], "unload": ["name"], "pin": ["name"], "unpin": ["name"],
    "cancel": ["request_id"],
    "tts": ["text"], "tts_stream": ["text"],
    "register_voice": ["voice_id", "prompt_audio", "prompt_text"],
    "text_to_audio": ["prompt"], "talking_head": ["audio"], "transcribe": ["audio"],
}


def _parameters(function):
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("cls", [modelhost.Client, modelhost.AsyncClient])
def test_options_are_keyword_only(cls):
    for name, positional in POSITIONAL.items():
        if not hasattr(cls, name):
            continue  # events: the blocking client's only
        parameters = _parameters(getattr(cls, name))
        assert [p.name for p in parameters
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == positional, name
        assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
                   for p in parameters if p.name not in positional), name


def test_an_option_passed_by_position_is_refused(tmp_path):
    with pytest.raises(TypeError):
        modelhost.Client("ipc://{}/nobody.sock".format(tmp_path), 5.0)
    with modelhost.Client("ipc://{}/nobody.sock".format(tmp_path)) as client:
        with pytest.raises(TypeError):
            client.call("espeak", "tts", 5.0)
        with pytest.raises(TypeError):
            client.load("tts", 30)


@pytest.mark.parametrize("cls", [modelhost.Client, modelhost.AsyncClient])
def test_one_not_set_sentinel_for_every_option_whose_none_means_something(cls):
    defaults = [p.default for name in POSITIONAL if hasattr(cls, name)
                for p in _parameters(getattr(cls, name))
                if p.default is not inspect.Parameter.empty and p.default is not None
                and not isinstance(p.default, (str, int, float, bool))]
    assert defaults and all(default is _messages.NOT_SET for default in defaults)
    assert repr(_messages.NOT_SET) == "NOT_SET"  # reads as such in help()


# --- ZeroMQ and msgpack failures leave the client as modelhost errors ---------------


@pytest.fixture
def endpoint():
    """A short ipc endpoint (socket paths have a length limit) that nothing serves yet."""
    directory = tempfile.mkdtemp(prefix="mh-", dir="/tmp")
    yield "ipc://{}/frontend.sock".format(directory)
    shutil.rmtree(directory, ignore_errors=True)


class StandIn(object):
    """The broker's frontend as a bare ROUTER: the test reads requests and writes replies."""

    def __init__(self, endpoint):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(endpoint)

    def request(self):
        """(identity, header) of the next request other than a ping or a cancel."""
        while True:
            assert self.router.poll(10000), "no request within 10 s"
            identity, *frames = self.router.recv_multipart()
            header, _ = protocol.decode(frames)
            if header["op"] not in (protocol.PING, protocol.CANCEL):
                return identity, header

    def reply(self, identity, *frames):
        self.router.send_multipart([identity] + list(frames))

    def result(self, identity, request_id, value):
        self.reply(identity, *protocol.encode({"kind": protocol.RESULT, "id": request_id,
                                               "value": value}))

    def close(self):
        self.context.destroy(linger=0)


@pytest.fixture
def stand_in(endpoint):
    broker = StandIn(endpoint)
    yield broker
    broker.close()


def _from_zmq(error):
    return isinstance(error.__cause__, zmq.ZMQError)


def _from_msgpack(error):
    return type(error.__cause__).__module__.split(".")[0] == "msgpack"


@pytest.mark.parametrize("bad", ["bogus://host", "tcp://"])
def test_a_malformed_endpoint_is_a_transport_error(bad):
    for cls in (modelhost.Client, modelhost.AsyncClient):
        with pytest.raises(TransportError) as info:
            cls(bad)
        assert _from_zmq(info.value)
        assert "cannot connect to the broker at {}".format(bad) in str(info.value)
        assert "tcp://host:port" in str(info.value)  # what an endpoint looks like


def test_the_command_line_says_why_an_endpoint_is_malformed(capsys):
    assert cli.main(["ps", "--endpoint", "bogus://host"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("modelhost: [transport] cannot connect to the broker at bogus://host")
    assert "Traceback" not in err


def test_sending_on_a_closed_socket_is_a_transport_error(endpoint):
    context = zmq.Context()
    client = modelhost.Client(endpoint, context=context)
    context.destroy(linger=0)  # closes the client's socket under it
    with pytest.raises(TransportError) as info:
        client.ps(timeout=1)
    assert _from_zmq(info.value) and "cannot send to the broker" in str(info.value)
    client.close()


def test_receiving_on_a_closed_socket_is_a_transport_error(endpoint, monkeypatch):
    monkeypatch.setattr(protocol, "HEARTBEAT_S", 1e9)  # no ping due: the wait is a receive
    context = zmq.Context()
    client = modelhost.Client(endpoint, context=context)
    stream = client.stream("probe", "count", timeout=10)  # sent: DEALERs queue until connected
    context.destroy(linger=0)
    with pytest.raises(TransportError) as info:
        next(stream)
    assert _from_zmq(info.value) and "cannot receive from the broker" in str(info.value)
    client.close()


def test_a_reply_that_is_not_msgpack_is_a_bad_message(stand_in, endpoint):
    with modelhost.Client(endpoint) as client:
        stream = client.stream("probe", "count", timeout=10)
        identity, header = stand_in.request()
        stand_in.reply(identity, b"\xc1 not msgpack")
        with pytest.raises(BadMessage) as info:
            next(stream)
        assert _from_msgpack(info.value)


def test_an_event_that_is_not_msgpack_is_a_bad_message(stand_in, endpoint):
    publisher = stand_in.context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    events = "{}-events".format(endpoint)
    publisher.bind(events)
    with modelhost.Client(endpoint) as client:
        answered = threading.Thread(target=lambda: stand_in.result(
            *_request_id(stand_in), {"broker": {"events": events}}))
        answered.start()
        stream = client.events(kinds=["state"], timeout=10)
        answered.join()
        stop = threading.Event()

        def publish():  # until the subscription has connected and heard one
            while not stop.wait(0.05):
                publisher.send_multipart([b"state", b"\xc1 not msgpack"])

        publishing = threading.Thread(target=publish)
        publishing.start()
        try:
            with pytest.raises(BadMessage) as info:
                next(stream)
            assert _from_msgpack(info.value)
        finally:
            stop.set()
            publishing.join()


def _request_id(stand_in):
    identity, header = stand_in.request()
    return identity, header["id"]


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))  # a failure, never a hang


def test_async_reply_that_is_not_msgpack_fails_the_waiting_calls(stand_in, endpoint):
    async def scenario():
        async with modelhost.AsyncClient(endpoint) as client:
            calls = [asyncio.ensure_future(client.call("probe", "add", a=n)) for n in (1, 2)]
            requests = [await asyncio.get_running_loop().run_in_executor(
                None, stand_in.request) for _ in calls]
            stand_in.reply(requests[0][0], b"\xc1 not msgpack")
            for call in calls:  # whose reply it was cannot be known: both hear why
                with pytest.raises(BadMessage) as info:
                    await call
                assert _from_msgpack(info.value)
            # The client goes on: a new call starts a new reader.
            again = asyncio.ensure_future(client.call("probe", "add", a=3))
            identity, request_id = await asyncio.get_running_loop().run_in_executor(
                None, _request_id, stand_in)
            stand_in.result(identity, request_id, 3)
            assert await again == 3

    _run(scenario())


def test_async_reply_of_another_version_is_a_protocol_mismatch(stand_in, endpoint):
    async def scenario():
        async with modelhost.AsyncClient(endpoint) as client:
            call = asyncio.ensure_future(client.ps(timeout=10))
            identity, request_id = await asyncio.get_running_loop().run_in_executor(
                None, _request_id, stand_in)
            stand_in.reply(identity, msgpack.packb({"v": 999, "kind": "result",
                                                    "id": request_id}))
            with pytest.raises(ProtocolMismatch):
                await call

    _run(scenario())


def test_async_socket_closed_under_a_call_is_a_transport_error(stand_in, endpoint):
    async def scenario():
        context = zmq.asyncio.Context()
        client = modelhost.AsyncClient(endpoint, context=context)
        call = asyncio.ensure_future(client.call("probe", "add", a=1))
        await asyncio.get_running_loop().run_in_executor(None, stand_in.request)
        context.destroy(linger=0)  # the reader is waiting on the socket: pyzmq cancels that
        with pytest.raises(TransportError, match="socket was closed"):
            await call
        await client.aclose()

    _run(scenario())


def test_async_sending_on_a_closed_socket_is_a_transport_error(endpoint):
    async def scenario():
        context = zmq.asyncio.Context()
        client = modelhost.AsyncClient(endpoint, context=context)
        context.destroy(linger=0)
        with pytest.raises(TransportError) as info:
            await client.call("probe", "add", a=1)
        assert _from_zmq(info.value) and "cannot send to the broker" in str(info.value)
        await client.aclose()

    _run(scenario())
