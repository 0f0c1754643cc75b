"""The builders and parsers of modelhost.protocol: every message kind has a builder, each
builder's frames decode and pass the schema of their kind, and what a receiver reads
from them is what the sender put in."""

import numpy
import pytest

from modelhost import errors, protocol
from modelhost.protocol import DaemonState, Priority, Tier

CLIENT = b"c-4242-0123456789ab"
MEM = {"rss": 1 << 20, "rss_peak": 2 << 20, "cuda": None, "cuda_peak": None}


def decoded(frames):
    """What a receiver gets: the frames as bytes on the wire, decoded."""
    return protocol.decode([bytes(frame) for frame in frames])


# One example of each kind that has a schema, built by its builder.
REQUESTS = {
    protocol.CALL: lambda: protocol.call_message(7, "tts", "say", {"text": "hi"},
                                                 Priority.BATCH, True, 30),
    protocol.CANCEL: lambda: protocol.cancel_message(7),
    protocol.PING: lambda: protocol.ping_message("ping-1", [1, "r-2"]),
    protocol.PS: lambda: protocol.ps_message(8),
    protocol.SUPERVISOR: lambda: protocol.supervisor_message(
        9, {"tts": {"status": "running", "pid": 42, "restarts": 0, "error": None}}, "token"),
    protocol.LOAD: lambda: protocol.model_message(protocol.LOAD, 10, "tts", 60, Priority.NORMAL),
    protocol.UNLOAD: lambda: protocol.model_message(protocol.UNLOAD, 11, "tts", 60),
    protocol.PIN: lambda: protocol.model_message(protocol.PIN, 12, "tts"),
    protocol.UNPIN: lambda: protocol.model_message(protocol.UNPIN, 13, "tts"),
}
DAEMON_MESSAGES = {
    protocol.REGISTER: lambda: protocol.register_message(
        name="tts", pid=42, interpreter="CPython 3.7.17 (/venv/bin/python)", python="3.7.17",
        engine="pkg.mod:Engine", methods=["say"], slots=[b"tts:42:s0"],
        state=DaemonState.UNLOADED, tier=Tier.UNLOADED, tiers=[Tier.RESIDENT, Tier.UNLOADED],
        mem=MEM, error=None, facts={"device": "cpu"}, loads=0, uptime_s=1.5,
        running=[{"id": 3, "client": CLIENT, "method": "say", "slot": 0}]),
    protocol.STATE: lambda: protocol.state_message(
        state=DaemonState.READY, tier=Tier.RESIDENT, mem=MEM, loads=1, facts={}, error=None,
        took_s=0.25, failed=None),
    protocol.HEARTBEAT: lambda: protocol.heartbeat_message(DaemonState.BUSY, 1, MEM),
}
REPLIES = {
    protocol.PARTIAL: lambda: protocol.partial_reply(7, CLIENT, 0, b"chunk"),
    protocol.PROGRESS: lambda: protocol.progress_reply(7, CLIENT, 0.5, "decode", "half way"),
    protocol.RESULT: lambda: protocol.result_reply(7, {"audio": b"\x00\x01"}, CLIENT, MEM),
    protocol.ERROR: lambda: protocol.error_reply(7, errors.EngineError("boom", {"type": "E"}),
                                                 CLIENT, MEM),
    protocol.CANCELLED: lambda: protocol.cancelled_reply(7, "the call was cancelled", CLIENT,
                                                         MEM),
}


def test_every_kind_with_a_schema_has_a_builder_here():
    assert set(REQUESTS) == set(protocol.REQUEST_SCHEMAS)
    assert set(DAEMON_MESSAGES) == set(protocol.DAEMON_SCHEMAS)
    assert set(REPLIES) == set(protocol.REPLY_SCHEMAS)


@pytest.mark.parametrize("op", sorted(REQUESTS))
def test_each_request_builder_passes_its_schema(op):
    header, _ = decoded(REQUESTS[op]())
    assert header["op"] == op and header["v"] == protocol.VERSION
    assert protocol.check_request(header) is header


@pytest.mark.parametrize("op", sorted(DAEMON_MESSAGES))
def test_each_daemon_message_builder_passes_its_schema(op):
    header, _ = decoded(DAEMON_MESSAGES[op]())
    assert header["op"] == op
    assert protocol.check_daemon_message(header) is header


@pytest.mark.parametrize("kind", sorted(REPLIES))
def test_each_reply_builder_passes_its_schema(kind):
    header, _ = decoded(REPLIES[kind]())
    assert header["kind"] == kind and header["client"] == CLIENT
    assert protocol.check_reply(header) is header


def test_the_brokers_heartbeat_is_bare_and_still_a_heartbeat():
    header, _ = decoded(protocol.heartbeat_message())
    assert header == {"op": protocol.HEARTBEAT, "v": protocol.VERSION}
    assert protocol.check_daemon_message(header)


def test_a_call_travels_from_client_through_broker_to_daemon():
    audio = numpy.arange(6, dtype="<i2")
    header, payloads = decoded(protocol.call_message(
        "r-1", "tts", "say", {"text": "hi", "audio": audio, "raw": b"xyz"}, Priority.NORMAL,
        False, 5))
    protocol.check_request(header)
    assert header["timeout"] == 5.0 and isinstance(header["timeout"], float)
    # The broker forwards the argument references and their frames untouched.
    forward = protocol.call_forward(header)
    assert set(forward) == {"method", "args", "stream"}
    at_daemon, frames = decoded(protocol.dispatch_message("r-1", CLIENT, forward, payloads, 4.5))
    assert at_daemon["op"] == protocol.CALL and at_daemon["client"] == CLIENT
    assert (at_daemon["id"], at_daemon["method"], at_daemon["stream"], at_daemon["timeout"]) == (
        "r-1", "say", False, 4.5)
    args = protocol.internalize(at_daemon["args"], frames)
    assert args["text"] == "hi" and args["raw"] == b"xyz"
    assert args["audio"].tolist() == audio.tolist()


def test_a_call_without_timeout_or_args_leaves_them_to_the_defaults():
    header, _ = decoded(protocol.call_message(1, "tts", "say", {}))
    assert "timeout" not in header and header["priority"] == Priority.NORMAL
    assert protocol.call_forward(protocol.check_request(header)) == {
        "method": "say", "args": {}, "stream": False}
    at_daemon, _ = decoded(protocol.dispatch_message(1, CLIENT, {"method": "say"}, []))
    assert "timeout" not in at_daemon


def test_model_operations_send_only_what_was_given():
    header, _ = decoded(protocol.model_message(protocol.PIN, 3, "tts"))
    assert header == {"op": protocol.PIN, "id": 3, "model": "tts", "v": protocol.VERSION}


def test_the_broker_to_daemon_commands():
    assert decoded(protocol.tier_message(Tier.OFFLOADED))[0]["tier"] == Tier.OFFLOADED
    assert decoded(protocol.reregister_message())[0]["op"] == protocol.REREGISTER
    cancel, _ = decoded(protocol.cancel_message(7, CLIENT))
    assert (cancel["op"], cancel["id"], cancel["client"]) == (protocol.CANCEL, 7, CLIENT)
    assert "client" not in decoded(protocol.cancel_message(7))[0]


def test_the_brokers_own_replies_carry_no_client_or_memory():
    for frames in (protocol.result_reply(1, {"a": 1}), protocol.cancelled_reply(1, "gone"),
                   protocol.error_reply(1, errors.Timeout("too slow"))):
        header, _ = decoded(frames)
        assert "client" not in header and "mem" not in header
    pong, _ = decoded(protocol.pong_reply("ping-3", [1], "b1", True))
    assert (pong["kind"], pong["id"], pong["known"], pong["broker"], pong["settled"]) == (
        protocol.PONG, "ping-3", [1], "b1", True)


def test_result_and_partial_values_read_back_with_their_binary_leaves():
    header, payloads = decoded(REPLIES[protocol.RESULT]())
    assert protocol.reply_value(header, payloads) == {"audio": b"\x00\x01"}
    assert header["mem"] == MEM
    header, payloads = decoded(REPLIES[protocol.PARTIAL]())
    assert (header["seq"], protocol.reply_value(header, payloads)) == (0, b"chunk")


def test_an_error_reply_reads_back_as_the_error_it_was_built_from():
    header, _ = decoded(REPLIES[protocol.ERROR]())
    error = protocol.reply_error(header)
    assert isinstance(error, errors.EngineError)
    assert (error.message, error.details) == ("boom", {"type": "E"})
    unknown, _ = decoded(protocol.error_reply(2, errors.error_from_wire("brand_new", "what")))
    assert protocol.reply_error(unknown).code == "brand_new"


def test_a_cancelled_reply_reads_back_as_cancelled():
    header, _ = decoded(REPLIES[protocol.CANCELLED]())
    error = protocol.reply_error(header)
    assert isinstance(error, errors.Cancelled) and error.message == "the call was cancelled"
    bare, _ = decoded(protocol.cancelled_reply(1, None))
    assert protocol.reply_error(bare).message == "the call was cancelled"


def test_a_state_message_round_trips_what_the_lifecycle_reports():
    header, _ = decoded(DAEMON_MESSAGES[protocol.STATE]())
    assert {key: header[key] for key in ("state", "tier", "took_s", "loads", "failed")} == {
        "state": DaemonState.READY, "tier": Tier.RESIDENT, "took_s": 0.25, "loads": 1,
        "failed": None}


def test_the_tier_tables_cover_every_tier_and_move():
    assert set(protocol.STATE_OF_TIER) == set(Tier.ALL)
    for (start, end), state in protocol.MOVING_STATE.items():
        assert start in Tier.ALL and end in Tier.ALL and start != end
        assert state in DaemonState.ALL
