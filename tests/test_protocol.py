"""Tests of modelhost.protocol (the wire contract) and modelhost.errors (the error tree)."""

import inspect
import re
import subprocess
import sys

import msgpack
import numpy
import pytest

from modelhost import errors, protocol
from modelhost.errors import (
    BadMessage, ModelhostError, ProtocolMismatch, error_from_wire,
)


def round_trip(value):
    """`value` through encode_value_message -> bytes on the wire -> decode -> internalize."""
    frames = protocol.encode_value_message({"kind": protocol.RESULT, "id": 7}, "value", value)
    wire = [bytes(frame) for frame in frames]  # what a socket would carry
    header, payloads = protocol.decode(wire)
    return protocol.internalize(header["value"], payloads)


def assert_same_array(received, sent):
    assert isinstance(received, numpy.ndarray)
    assert received.dtype == sent.dtype
    assert received.shape == sent.shape
    assert received.tobytes() == sent.tobytes()  # bit-exact, NaN payloads and -0.0 included


def packed(header):
    return msgpack.packb(header, use_bin_type=True)


# --- encode / decode -----------------------------------------------------------


def test_encode_adds_the_version_and_keeps_payload_frames_as_given():
    payload = bytearray(b"\x00\x01")
    frames = protocol.encode({"op": protocol.CALL, "id": 3}, [payload])
    assert msgpack.unpackb(frames[0], raw=False) == {"op": "call", "id": 3,
                                                     "v": protocol.VERSION}
    assert frames[1] is payload


def test_encode_does_not_change_the_callers_header():
    header = {"op": protocol.PING}
    protocol.encode(header)
    assert header == {"op": protocol.PING}


def test_encode_decode_round_trip_keeps_str_and_bytes_apart():
    header = {"op": protocol.CALL, "id": "r-1", "client": b"\x00\xffid", "args": {"n": 3},
              "nested": [1.5, None, True, {"k": "v"}]}
    decoded, payloads = protocol.decode(protocol.encode(header, [b"p0", b"p1"]))
    assert decoded == dict(header, v=protocol.VERSION)
    assert isinstance(decoded["client"], bytes) and isinstance(decoded["id"], str)
    assert payloads == [b"p0", b"p1"]


def test_decode_header_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    frame = zmq.Frame(protocol.encode({"kind": protocol.PONG, "id": 1})[0])
    assert protocol.decode_header(frame)["kind"] == protocol.PONG


@pytest.mark.parametrize("version", [None, 0, protocol.VERSION + 1, "1"])
def test_other_version_raises_protocol_mismatch_with_the_request_id(version):
    header = {"op": protocol.CALL, "id": 42}
    if version is not None:
        header["v"] = version
    with pytest.raises(ProtocolMismatch) as info:
        protocol.decode([packed(header)])
    assert info.value.details == {"id": 42}
    assert info.value.code == "protocol_mismatch"
    assert "protocol {}".format(protocol.VERSION) in info.value.message


@pytest.mark.parametrize("frame", [
    packed([1, 2, 3]),
    packed("a string"),
    packed(7),
    packed(None),
], ids=["array", "string", "int", "nil"])
def test_header_that_is_not_a_map_is_a_bad_message(frame):
    with pytest.raises(BadMessage, match="must be a msgpack map"):
        protocol.decode([frame])


@pytest.mark.parametrize("frame", [
    b"",
    b"\xc1",  # a byte msgpack never uses
    b"\x81\xa1v",  # a map cut short
    packed({"v": protocol.VERSION}) + b"\x00",  # trailing bytes
    b"GET / HTTP/1.1\r\n",
], ids=["empty", "reserved-byte", "truncated", "trailing", "http"])
def test_garbage_header_is_a_bad_message(frame):
    with pytest.raises(BadMessage, match="not valid msgpack"):
        protocol.decode([frame])


def test_empty_message_is_a_bad_message():
    with pytest.raises(BadMessage, match="empty message"):
        protocol.decode([])


def test_error_header():
    assert protocol.error_header(5, errors.Timeout("too slow")) == {
        "kind": protocol.ERROR, "id": 5, "code": "timeout", "message": "too slow"}
    assert protocol.error_header(5, errors.EngineError("boom", {"type": "KeyError"}))[
        "details"] == {"type": "KeyError"}


def test_terminal_kinds():
    assert protocol.TERMINAL_KINDS == {protocol.RESULT, protocol.ERROR, protocol.CANCELLED}
    assert protocol.PARTIAL not in protocol.TERMINAL_KINDS
    assert protocol.PROGRESS not in protocol.TERMINAL_KINDS


# --- externalize / internalize: binary values ----------------------------------


def test_binary_leaves_travel_as_frames_not_inside_msgpack():
    big = bytes(range(256)) * 64
    frames = protocol.encode_value_message({"kind": protocol.RESULT, "id": 1}, "value",
                                           {"audio": big})
    assert len(frames) == 2
    assert frames[1] is big  # not copied
    assert len(frames[0]) < 100


def test_nested_binary_values_round_trip():
    value = {
        "bytes": b"\x00\x01\xff",
        "bytearray": bytearray(b"abc"),
        "memoryview": memoryview(b"0123456789")[2:5],
        "empty": b"",
        "list": [b"a", [b"b", {"deep": bytearray(b"c")}], "text", 1, None],
        "tuple": (b"t", 2),
        "plain": {"n": 1, "f": 2.5, "s": "str", "t": True},
    }
    assert round_trip(value) == {
        "bytes": b"\x00\x01\xff",
        "bytearray": b"abc",
        "memoryview": b"234",
        "empty": b"",
        "list": [b"a", [b"b", {"deep": b"c"}], "text", 1, None],
        "tuple": [b"t", 2],
        "plain": {"n": 1, "f": 2.5, "s": "str", "t": True},
    }


def test_each_binary_leaf_gets_its_own_frame_in_order():
    frames = []
    reference = protocol.externalize([b"first", {"x": b"second"}, b"third"], frames)
    assert frames == [b"first", b"second", b"third"]
    assert protocol.internalize(reference, frames) == [b"first", {"x": b"second"}, b"third"]


def test_internalize_accepts_zmq_frames():
    zmq = pytest.importorskip("zmq")
    frames = []
    reference = protocol.externalize({"b": b"xyz", "a": numpy.arange(3, dtype="<u2")}, frames)
    zmq_frames = [zmq.Frame(bytes(frame)) for frame in frames]
    value = protocol.internalize(reference, zmq_frames)
    assert value["b"] == b"xyz"
    assert_same_array(value["a"], numpy.arange(3, dtype="<u2"))


# --- externalize / internalize: numpy arrays -----------------------------------

ARRAYS = {
    "float32-2d": numpy.arange(12, dtype=numpy.float32).reshape(3, 4) / 7,
    "float64-specials": numpy.array([numpy.nan, -0.0, numpy.inf, -numpy.inf, 1e-310]),
    "float16": numpy.linspace(-1, 1, 5, dtype=numpy.float16),
    "int16-pcm": (numpy.sin(numpy.arange(1000) / 10) * 32767).astype(numpy.int16),
    "uint8-image": numpy.arange(2 * 3 * 4, dtype=numpy.uint8).reshape(2, 3, 4),
    "int64": numpy.array([-2**63, 2**63 - 1], dtype=numpy.int64),
    "bool": numpy.array([True, False, True]),
    "complex64": numpy.array([1 + 2j, -3.5j], dtype=numpy.complex64),
    "bytes-S3": numpy.array([b"abc", b"d"], dtype="S3"),
    "unicode-U2": numpy.array(["hé", "ß"], dtype="<U2"),
    "big-endian-int32": numpy.arange(6, dtype=">i4").reshape(2, 3),
    "big-endian-float64": numpy.array([1.5, -2.25], dtype=">f8"),
    "empty-1d": numpy.zeros(0, dtype=numpy.float32),
    "empty-2d": numpy.zeros((0, 3), dtype=numpy.int32),
    "empty-inner": numpy.zeros((2, 0), dtype=numpy.int64),
    "non-contiguous-slice": numpy.arange(20, dtype=numpy.int32)[::3],
    "transposed": numpy.arange(24, dtype=numpy.float64).reshape(2, 3, 4).transpose(2, 0, 1),
    "fortran-order": numpy.asfortranarray(numpy.arange(6, dtype=numpy.int32).reshape(2, 3)),
    "negative-stride": numpy.arange(5, dtype=numpy.int16)[::-1],
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_array_round_trip_is_bit_exact(name):
    sent = ARRAYS[name]
    received = round_trip({"array": sent})["array"]
    assert_same_array(received, sent)


def test_arrays_nested_with_bytes_round_trip():
    value = {"chunks": [numpy.ones((2, 2), dtype=numpy.float32), b"raw",
                        {"mask": numpy.array([True, False])}]}
    received = round_trip(value)
    assert_same_array(received["chunks"][0], value["chunks"][0])
    assert received["chunks"][1] == b"raw"
    assert_same_array(received["chunks"][2]["mask"], value["chunks"][2]["mask"])


def test_array_reference_names_frame_dtype_and_shape():
    frames = []
    reference = protocol.externalize(numpy.zeros((2, 5), dtype="<f4"), frames)
    assert reference.code == 2
    assert msgpack.unpackb(reference.data) == [0, "<f4", [2, 5]]
    assert len(frames[0]) == 40


def test_received_array_is_a_view_on_the_frame():
    frame = bytearray(numpy.arange(4, dtype="<i4").tobytes())
    reference = msgpack.ExtType(2, msgpack.packb([0, "<i4", [4]]))
    array = protocol.internalize(reference, [frame])
    frame[0] = 9
    assert array[0] == 9  # zero copy: no second buffer of megabytes


@pytest.mark.parametrize("sent", [numpy.array(3.5), numpy.array(7, dtype=">i2")],
                         ids=["float64", "big-endian-int16"])
def test_zero_dimensional_array_round_trip(sent):
    assert_same_array(round_trip(sent), sent)


def test_structured_array_round_trip():
    sent = numpy.zeros(3, dtype=[("start", "<f4"), ("stop", "<f8")])
    sent["stop"] = [1.0, 2.0, 3.0]
    assert_same_array(round_trip(sent), sent)


@pytest.mark.parametrize("sent", [
    numpy.array([{"a": 1}, None], dtype=object),
    numpy.array([1, "two"], dtype=object),
    numpy.zeros(2, dtype=[("x", "<i4"), ("o", object)]),
], ids=["objects", "mixed", "struct-with-object"])
def test_object_arrays_rejected_with_type_error(sent):
    with pytest.raises(TypeError, match="arrays of Python objects"):
        protocol.externalize({"nested": [sent]}, [])


def test_internalize_without_numpy_hands_over_raw_data(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_numpy(name, *args, **kwargs):
        if name == "numpy":
            raise ImportError("no numpy here")
        return real_import(name, *args, **kwargs)

    frames = []
    reference = protocol.externalize(numpy.arange(3, dtype="<i2"), frames)
    monkeypatch.setattr(builtins, "__import__", no_numpy)
    assert protocol.internalize(reference, frames) == {
        "dtype": "<i2", "shape": [3], "data": b"\x00\x00\x01\x00\x02\x00"}


# A fresh interpreter whose numpy import stops inside numpy's own __init__
# (numpy is in sys.modules, not yet whole) until every other thread either
# finished its protocol work or waits for that import.
NUMPY_IMPORT_RACE = r"""
import importlib.machinery, sys, threading, time
import msgpack
from modelhost import protocol

assert "numpy" not in sys.modules
importing, go = threading.Event(), threading.Event()


class Paused(object):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        importing.set()
        go.wait()
        self.loader.exec_module(module)


class PauseFirstNumpySubmodule(object):
    def find_spec(self, name, path, target=None):
        if not name.startswith("numpy.") or importing.is_set():
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        spec.loader = Paused(spec.loader)
        return spec


sys.meta_path.insert(0, PauseFirstNumpySubmodule())
array_ref = msgpack.ExtType(2, msgpack.packb([0, "<i4", [2]]))
frames = [b"\x01\x00\x00\x00\x02\x00\x00\x00"]
outcomes = {}


def run(name, work):
    try:
        outcomes[name] = work()
    except Exception as exc:
        outcomes[name] = exc


def first_array():  # a call's first array: it imports numpy
    return protocol.internalize({"a": array_ref}, frames)["a"].tolist()


def another_array():  # the same, on another slot
    return protocol.internalize({"a": array_ref}, frames)["a"].tolist()


def a_result():  # another slot's reply, with no array in it
    return len(protocol.encode_value_message({"kind": "result"}, "value", {"n": 1}))


def waiting_for_numpy(thread):
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name in ("_import_numpy", "_lock_unlock_module"):
            return True
        frame = frame.f_back
    return False


importer = threading.Thread(target=run, args=("first_array", first_array))
importer.start()
importing.wait()
assert sys.modules["numpy"].__spec__._initializing
others = [threading.Thread(target=run, args=(name, work))
          for name, work in (("another_array", another_array), ("a_result", a_result))]
for thread in others:
    thread.start()
deadline = time.monotonic() + 60  # only bounds a hang; no outcome depends on it
while not all(not t.is_alive() or waiting_for_numpy(t) for t in others):
    assert time.monotonic() < deadline, "threads neither done nor waiting for numpy"
    time.sleep(0.001)
go.set()
for thread in [importer] + others:
    thread.join()
print(outcomes)
assert outcomes == {"first_array": [1, 2], "another_array": [1, 2], "a_result": 1}, outcomes
"""


@pytest.mark.parametrize("python", ["host", "py37", "py312"])
def test_a_thread_never_sees_numpy_half_imported_by_another(python, request):
    # A daemon's slots are threads: the first call carrying an array imports
    # numpy, and meanwhile a reply on another slot must not meet the module
    # half made ("partially initialized module 'numpy' has no attribute ...").
    interpreter = sys.executable if python == "host" else str(
        request.getfixturevalue("test_venvs")[python] / "bin" / "python")
    done = subprocess.run([interpreter, "-c", NUMPY_IMPORT_RACE], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=120)
    assert done.returncode == 0, done.stdout.decode(errors="replace")


# --- bad references --------------------------------------------------------------


@pytest.mark.parametrize("index", [1, 5, -1, "0", None])
def test_bytes_reference_to_a_missing_frame_is_a_bad_message(index):
    reference = msgpack.ExtType(1, msgpack.packb(index))
    with pytest.raises(BadMessage, match="payload frame"):
        protocol.internalize({"x": [reference]}, [b"only frame 0"])


def test_array_reference_to_a_missing_frame_is_a_bad_message():
    reference = msgpack.ExtType(2, msgpack.packb([3, "<f4", [1]]))
    with pytest.raises(BadMessage, match="payload frame 3"):
        protocol.internalize(reference, [b"\x00" * 4])


@pytest.mark.parametrize("frame, dtype, shape", [
    (b"\x00" * 7, "<f4", [2]),  # not a whole number of float32s
    (b"\x00" * 8, "<f4", [3]),  # two float32s, shape says three
    (b"\x00" * 24, "<f8", [2, 2]),  # three float64s, shape says four
    (b"", "<i4", [1]),  # empty frame, one element expected
    (b"\x00" * 8, "<f4", [4, -1, 2]),  # shape that does not fit
], ids=["ragged", "short", "long-2d", "empty", "bad-shape"])
def test_array_frame_that_does_not_match_dtype_and_shape_is_a_bad_message(frame, dtype, shape):
    reference = msgpack.ExtType(2, msgpack.packb([0, dtype, shape]))
    with pytest.raises(BadMessage, match="does not match"):
        protocol.internalize(reference, [frame])


@pytest.mark.parametrize("meta", [[0, "<f4"], "not a list", [0, "<f4", [1], "extra"]])
def test_malformed_array_reference_is_a_bad_message(meta):
    reference = msgpack.ExtType(2, msgpack.packb(meta))
    with pytest.raises(BadMessage, match=r"\[frame, dtype, shape\]"):
        protocol.internalize(reference, [b"\x00" * 4])


def test_unknown_dtype_is_a_bad_message():
    reference = msgpack.ExtType(2, msgpack.packb([0, "<nonsense", [1]]))
    with pytest.raises(BadMessage, match="does not match"):
        protocol.internalize(reference, [b"\x00" * 4])


def test_unknown_reference_type_is_a_bad_message():
    with pytest.raises(BadMessage, match="unknown payload reference type 9"):
        protocol.internalize(msgpack.ExtType(9, msgpack.packb(0)), [b""])


def test_reference_that_is_not_msgpack_is_a_bad_message():
    with pytest.raises(BadMessage, match="not valid msgpack"):
        protocol.internalize(msgpack.ExtType(1, b"\xc1"), [b""])


# --- the error tree -------------------------------------------------------------

WIRE_CODES = {
    "broker_unavailable": errors.BrokerUnavailable,
    "protocol_mismatch": errors.ProtocolMismatch,
    "bad_message": errors.BadMessage,
    "request_lost": errors.RequestLost,
    "unknown_model": errors.UnknownModel,
    "unknown_method": errors.UnknownMethod,
    "bad_arguments": errors.BadArguments,
    "payload_too_large": errors.PayloadTooLarge,
    "over_capacity": errors.OverCapacity,
    "insufficient_memory": errors.InsufficientMemory,
    "timeout": errors.Timeout,
    "cancelled": errors.Cancelled,
    "daemon_crashed": errors.DaemonCrashed,
    "daemon_unavailable": errors.DaemonUnavailable,
    "engine_error": errors.EngineError,
    "internal": errors.InternalError,
}


@pytest.mark.parametrize("code", sorted(WIRE_CODES))
def test_error_from_wire_maps_each_code_to_its_class(code):
    error = error_from_wire(code, "what to do next", {"daemon": "tts"})
    assert type(error) is WIRE_CODES[code]
    assert error.code == code
    assert error.message == "what to do next"
    assert error.details == {"daemon": "tts"}
    assert str(error) == "[{}] what to do next".format(code)


@pytest.mark.parametrize("code", sorted(set(errors.ERRORS_BY_CODE) - set(WIRE_CODES)))
def test_every_other_class_code_maps_back_to_its_class(code):
    # Codes of the intermediate classes (transport, bad_request, daemon_error, state).
    assert error_from_wire(code, "m").code == code


def test_error_from_wire_keeps_an_unknown_code():
    error = error_from_wire("gpu_on_fire", "call the fire brigade", {"gpu": 0})
    assert type(error) is ModelhostError
    assert error.code == "gpu_on_fire"
    assert error.details == {"gpu": 0}
    assert str(error) == "[gpu_on_fire] call the fire brigade"
    assert ModelhostError.code == "internal"  # the class itself is untouched


def test_error_details_are_copied_and_default_to_empty():
    details = {"id": 1}
    error = ModelhostError("m", details)
    details["id"] = 2
    assert error.details == {"id": 1}
    assert ModelhostError("m").details == {}


def _tree_from_docstring():
    """{class name: parent class name} as drawn in the docstring of modelhost.errors.

    Each level of the drawing indents its class names by four more columns.
    """
    parents, stack = {}, []
    for line in errors.__doc__.splitlines():
        match = re.search(r"[A-Z][A-Za-z]+", line)
        if not line.startswith("    ") or not match or \
                not line.lstrip(" |+-").startswith(match.group()):
            continue  # prose, not a line of the drawing
        depth = match.start() // 4
        del stack[depth - 1:]
        parents[match.group()] = stack[-1] if stack else None
        stack.append(match.group())
    return parents


def test_exception_tree_matches_the_docstring():
    drawn = _tree_from_docstring()
    defined = {name: cls for name, cls in vars(errors).items()
               if inspect.isclass(cls) and issubclass(cls, ModelhostError)}
    assert set(drawn) == set(defined)
    for name, parent in drawn.items():
        if parent is None:
            assert defined[name] is ModelhostError
        else:
            assert defined[name].__bases__ == (defined[parent],), name


def test_docstring_codes_match_the_classes():
    checked = 0
    for line in errors.__doc__.splitlines():
        # "+-- Timeout    timeout: the request's deadline passed" or "+-- UnknownModel  unknown_model"
        match = re.match(r"^[ |+-]*([A-Z]\w+)\s+([a-z_]+)(?::|$)", line)
        if match:
            assert getattr(errors, match.group(1)).code == match.group(2), line
            checked += 1
    assert checked == len(WIRE_CODES)


def test_public_errors_are_exported_from_the_package():
    import modelhost

    for name in _tree_from_docstring():
        assert getattr(modelhost, name) is getattr(errors, name)
        assert name in modelhost.__all__


def test_datetime_arrays_travel_as_raw_bytes():
    sent = numpy.array(["2026-11-22T01:00", "1970-01-01T00:00"], dtype="datetime64[ms]")
    assert_same_array(round_trip(sent), sent)


def test_ndarray_subclasses_and_numpy_scalars(tmp_path):
    mapped = numpy.memmap(str(tmp_path / "m.bin"), dtype="<f4", mode="w+", shape=(4,))
    mapped[:] = [1, 2, 3, 4]
    received = round_trip(mapped)
    assert type(received) is numpy.ndarray and received.tolist() == [1.0, 2.0, 3.0, 4.0]
    frames = []
    assert protocol.externalize({"n": numpy.int64(7), "x": numpy.float32(0.5)}, frames) == \
        {"n": 7, "x": 0.5}
    assert frames == []
