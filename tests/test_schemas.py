"""The message schemas of modelhost.protocol, one check per message kind, and the
broker's holding of replies (broker/parking.py)."""

import math

import pytest

from modelhost import protocol
from modelhost.broker.parking import Parking
from modelhost.errors import BadArguments, BadMessage

NAN = float("nan")
CALL = {"op": "call", "id": 1, "model": "tts", "method": "say"}


def refused(header, check=protocol.check_request, error=BadMessage):
    with pytest.raises(error) as caught:
        check(header)
    return caught.value


@pytest.mark.parametrize("request_id", [NAN, float("inf"), 1.5, True, [1], {"a": 1}, b"id",
                                        None, "x" * 257])
def test_a_request_id_must_be_an_int_or_a_bounded_string(request_id):
    error = refused(dict(CALL, id=request_id))
    assert "`id` of a call message must be an integer or a string" in error.message
    assert error.details == {"id": None}  # the reply cannot name it


@pytest.mark.parametrize("request_id", [0, -3, 2**63, "a", "x" * 256])
def test_usable_ids_pass(request_id):
    assert protocol.check_request(dict(CALL, id=request_id))


@pytest.mark.parametrize("timeout", [NAN, float("inf"), -1, 0, True, "5", 400 * 86400])
def test_a_timeout_must_be_finite_positive_and_at_most_a_year(timeout):
    error = refused(dict(CALL, timeout=timeout))
    assert "`timeout`" in error.message and error.details == {"id": 1}


def test_args_that_are_not_a_map_are_bad_arguments():
    error = refused(dict(CALL, args=[1, 2]), error=BadArguments)
    assert error.code == "bad_arguments"


@pytest.mark.parametrize("header, field", [
    ({"op": "call", "id": 1, "method": "say"}, "model"),
    (dict(CALL, model=["tts"]), "model"),
    (dict(CALL, model=""), "model"),
    (dict(CALL, priority="urgent"), "priority"),
    (dict(CALL, priority=["batch"]), "priority"),
    (dict(CALL, stream=1), "stream"),
    ({"op": "ping", "id": 1, "ids": [[1]]}, "ids"),
    ({"op": "ping", "id": 1, "ids": [NAN]}, "ids"),
    ({"op": "pin", "id": 1, "model": ["tts"]}, "model"),
    ({"op": "load", "id": 1, "model": "tts", "timeout": NAN}, "timeout"),
    ({"op": "supervisor", "id": 1, "processes": {"a": {"status": "running"}}}, "token"),
    ({"op": "supervisor", "id": 1, "token": "t", "processes": {"a": 5}}, "processes"),
    ({"op": "supervisor", "id": 1, "token": "t", "processes": {"a": {"status": "x"}}},
     "processes"),
    ({"op": "supervisor", "id": 1, "token": "t",
      "processes": {"a": {"status": "running", "pid": NAN}}}, "processes"),
])
def test_each_client_field_is_checked(header, field):
    assert "`{}`".format(field) in refused(header).message


def test_an_unknown_or_unhashable_op_is_named():
    assert "unknown op 'dance'" in refused({"op": "dance", "id": 1}).message
    assert "unknown op ['call']" in refused({"op": ["call"], "id": 1}).message


def test_fields_a_schema_does_not_name_pass_untouched():
    header = dict(CALL, future_field={"anything": [1, 2]})
    assert protocol.check_request(header) is header


def test_absent_request_fields_read_as_their_defaults():
    header = protocol.check_request(dict(CALL))
    assert (header["priority"], header["timeout"], header["stream"], header["args"]) == (
        protocol.Priority.NORMAL, None, False, {})
    assert protocol.check_request(dict(CALL))["args"] is not header["args"]  # one map each
    assert protocol.check_request({"op": "ping", "id": 1})["ids"] == []
    load = protocol.check_request({"op": "load", "id": 2, "model": "tts", "timeout": 5})
    assert (load["priority"], load["timeout"]) == (protocol.Priority.NORMAL, 5)
    sent = dict(CALL, priority="batch", stream=True, args={"n": 1})
    assert protocol.check_request(dict(sent)) == dict(sent, timeout=None)


REGISTER = {"op": "register", "name": "tts", "pid": 42, "state": "unloaded",
            "slots": [b"tts:42:s0"], "methods": ["say"], "tier": "unloaded",
            "mem": {"rss": 10, "cuda": None}, "running": [{"id": 3, "client": b"c", "slot": 0,
                                                           "method": "say"}]}


@pytest.mark.parametrize("change", [
    {"state": ["ready"]}, {"state": {"a": 1}}, {"state": "dancing"}, {"pid": 0},
    {"pid": "42"}, {"mem": {"rss": "a lot"}}, {"mem": {"rss": NAN}}, {"slots": [1]},
    {"slots": "tts"}, {"tier": "floating"}, {"facts": {"a": NAN}}, {"facts": {"a": b"x"}},
    {"running": [{"id": NAN, "client": b"c"}]}, {"running": [{"id": 1, "client": "c"}]},
    {"uptime_s": float("inf")}, {"methods": [["say"]]},
])
def test_each_register_field_is_checked(change):
    refused(dict(REGISTER, **change), protocol.check_daemon_message)


def test_a_real_register_passes():
    assert protocol.check_daemon_message(REGISTER)


@pytest.mark.parametrize("header", [
    {"kind": "result", "id": [1], "client": b"c"},
    {"kind": "result", "id": 1, "client": "c"},
    {"kind": "result", "id": 1},
    {"kind": "error", "id": 1, "client": b"c"},  # no code
    {"kind": "progress", "id": 1, "client": b"c", "fraction": NAN},
    {"kind": "progress", "id": 1, "client": b"c", "fraction": 2},
    {"kind": "partial", "id": 1, "client": b"c", "seq": -1},
    {"kind": {"a": 1}, "id": 1, "client": b"c"},
])
def test_replies_are_checked(header):
    refused(header, protocol.check_reply)


def test_plain_values_are_what_json_can_carry():
    assert protocol.is_plain({"a": [1, 2.5, "x", None, True, {"b": {}}]})
    for value in (NAN, math.inf, b"x", {1: 2}, (1, 2), object()):
        assert not protocol.is_plain({"a": value})
    deep = {}
    for _ in range(protocol.MAX_PLAIN_DEPTH + 1):
        deep = {"d": deep}
    assert not protocol.is_plain(deep)


def test_parking_holds_in_order_within_its_budget_and_expires():
    parking = Parking(max_bytes=10)
    assert parking.hold("a", [b"1234"], now=0.0)
    assert parking.hold("a", [b"56"], now=1.0)
    assert parking.hold("b", [b"789"], now=2.0)
    assert not parking.hold("b", [b"toolong"], now=2.0)  # 9 + 7 > 10
    assert "a" in parking and parking.size == 9
    assert parking.release("a") == [[b"1234"], [b"56"]]
    assert parking.release("a") == [] and parking.size == 3
    assert parking.expire(now=2.5, max_age_s=1.0) == []
    assert parking.expire(now=3.5, max_age_s=1.0) == [("b", [b"789"])]
    assert "b" not in parking and parking.size == 0 and parking.oldest() is None


def test_a_reply_nested_deeper_than_python_can_walk_is_a_bad_message():
    value = []
    for _ in range(100000):
        value = [value]
    with pytest.raises(BadMessage, match="nested too deeply"):
        protocol.reply_value({"kind": "result", "value": value}, [])
