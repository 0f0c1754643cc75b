"""Large payloads in shared memory (modelhost._shm): bit-exact across the threshold, owner-only,
never left behind, frames whenever shared memory cannot be used.

These encode and decode in this process, each test in a segment directory of its own.
"""

import errno
import logging
import os
import re
import stat
import subprocess
import sys

import msgpack
import numpy
import pytest

from modelhost import _shm, _shm_pool, protocol
from modelhost.errors import BadMessage


def segments_in(path):
    return sorted(os.listdir(str(path)))


def is_pool_file(name):
    return re.search(r"-p\d+$", name) is not None


def messages_in(path):
    """The segments that carry a message (not the pool files their bytes live in)."""
    return [name for name in segments_in(path) if not is_pool_file(name)]


@pytest.fixture(autouse=True)
def fresh_pools():
    """Each test starts with no pooled files in this process, and leaves none open."""
    yield
    for directory, pool in list(_shm_pool._pools.items()):
        pool.trim(idle_s=0.0)
        del _shm_pool._pools[directory]


def same(sent, received):
    """Bit-exact: the same type, dtype, shape and bytes, all the way down."""
    if isinstance(sent, numpy.ndarray):
        return (isinstance(received, numpy.ndarray) and received.dtype == sent.dtype
                and received.shape == sent.shape and received.tobytes() == sent.tobytes())
    if isinstance(sent, (bytes, bytearray, memoryview)):
        return isinstance(received, bytes) and received == bytes(sent)
    if isinstance(sent, dict):
        return isinstance(received, dict) and sent.keys() == received.keys() and all(
            same(sent[key], received[key]) for key in sent)
    if isinstance(sent, (list, tuple)):
        return isinstance(received, list) and len(sent) == len(received) and all(
            same(a, b) for a, b in zip(sent, received))
    return sent == received


def payloads(threshold):
    """Bytes and arrays of several dtypes just under, at and just over `threshold` bytes,
    0-d and structured included, and a few that always go as frames."""
    rng = numpy.random.default_rng(15)
    values = {}
    for label, size in (("under", threshold - 1), ("at", threshold), ("over", threshold + 1)):
        values["bytes_" + label] = rng.integers(0, 256, size, dtype=numpy.uint8).tobytes()
        values["u1_" + label] = rng.integers(0, 256, size, dtype=numpy.uint8)
    items = threshold // 8 + 1
    values.update({
        "f4": rng.standard_normal(items * 2).astype("<f4").reshape(2, -1),
        "f8_big_endian": rng.standard_normal(items).astype(">f8"),
        "i8": rng.integers(-2**62, 2**62, items, dtype=numpy.int64),
        "u2_3d": rng.integers(0, 2**16, items * 8, dtype=numpy.uint16).reshape(4, -1, 2),
        "c16": (rng.standard_normal(items) + 1j * rng.standard_normal(items)).astype("<c16"),
        "bool": rng.integers(0, 2, threshold + 7).astype(bool),
        "datetime": numpy.arange(items).astype("datetime64[ns]"),
        "nan_payloads": numpy.frombuffer(rng.bytes(items * 8), dtype="<f8"),  # any bit pattern
        "fortran": numpy.asfortranarray(rng.standard_normal((64, items // 64 + 1))),
        "strided": rng.standard_normal(items * 2)[::2],  # not contiguous: sent as a copy
        "structured": numpy.zeros(items, dtype=[("x", "<i4"), ("y", ">f8", (2,)),
                                                     ("tag", "S7")]),
        # 0-d: one element bigger than the threshold, and a plain small one.
        "zero_d_big": numpy.zeros((), dtype=[("block", "<f8", (items,))]),
        "zero_d_small": numpy.array(2.5),
        "empty": numpy.zeros((0, 3), dtype="<f4"),
        "nested": [{"deep": rng.integers(0, 256, threshold, dtype=numpy.uint8)}, b"tiny", 7],
        "text": "not binary",
    })
    values["structured"]["x"] = numpy.arange(items)
    values["structured"]["tag"] = b"abcdefg"
    values["zero_d_big"]["block"] = rng.standard_normal(items)
    return values


# --- in this process -----------------------------------------------------------------------

def test_round_trips_across_the_threshold_are_bit_exact(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=4096)
    values = payloads(4096)
    writer = segments.writer()
    frames = protocol.encode_value_message({"kind": "result", "id": 1, "client": b"c"},
                                           "value", values, writer)
    header, frames_in = protocol.decode(frames)
    protocol.check_reply(header)
    # Everything at or over the threshold is in one segment, owner-only; the rest in frames.
    (name,) = header["shm"]["segments"]
    assert messages_in(tmp_path) == [name]
    for each in segments_in(tmp_path):  # the message's name and its pool file: one file
        assert stat.S_IMODE(os.stat(str(tmp_path / each)).st_mode) == 0o600
    # bytes_under, u1_under, zero_d_small, empty and nested's b"tiny".
    assert len(frames_in) == 5
    assert header["shm"]["bytes"] >= sum(
        value.nbytes for key, value in values.items()
        if isinstance(value, numpy.ndarray) and value.nbytes >= 4096)
    received = protocol.internalize(header["value"], frames_in, segments.reader(unlink=True))
    assert same(values, received)
    assert messages_in(tmp_path) == []  # unlinked once mapped, the views still readable
    assert same(values, received)
    assert not received["u1_over"].flags.writeable  # read-only, like a frame's view


def test_an_array_from_a_segment_is_a_view_on_the_mapping(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=1)
    data = numpy.arange(1000, dtype="<u4")
    header, frames = protocol.decode(protocol.encode_value_message(
        {}, "value", {"a": data, "b": data}, segments.writer()))
    received = protocol.internalize(header["value"], frames, segments.reader(unlink=False))
    base = received["a"]
    while getattr(base, "base", None) is not None:
        base = base.base
    assert type(base.obj).__name__ == "mmap"
    # Both leaves in one file, each aligned for any dtype.
    offsets = [msgpack.unpackb(ext.data)[1] for ext in header["value"].values()]
    assert offsets[0] % 64 == 0 and offsets[1] % 64 == 0 and offsets[0] != offsets[1]
    assert messages_in(tmp_path) == header["shm"]["segments"]


def test_the_default_threshold_is_one_mebibyte(tmp_path):
    assert _shm.DEFAULT_THRESHOLD == 2**20
    segments = _shm.Segments(str(tmp_path))
    for size, in_segment in ((2**20 - 1, False), (2**20, True)):
        writer = segments.writer()
        header, frames = protocol.decode(protocol.encode_value_message(
            {}, "value", b"\x01" * size, writer))
        assert ("shm" in header) is in_segment and len(frames) == (0 if in_segment else 1)
        writer.discard()


def test_over_max_total_the_payload_goes_as_frames_and_says_so_once(tmp_path, caplog):
    segments = _shm.Segments(str(tmp_path), threshold=10, max_total=25000)
    first = segments.writer()
    protocol.encode_value_message({}, "value", b"a" * 20000, first)
    caplog.set_level(logging.INFO, logger="modelhost.shm")
    for _ in range(2):
        header, frames = protocol.decode(protocol.encode_value_message(
            {}, "value", b"b" * 20000, segments.writer()))
        assert "shm" not in header and bytes(frames[0]) == b"b" * 20000
    assert len(messages_in(tmp_path)) == 1
    assert [r.getMessage() for r in caplog.records].count(
        "large payloads travel as frames while the shared-memory segments in {} would exceed "
        "max_total (25000 bytes; broker.shm.max_total)".format(tmp_path)) == 1
    first.discard()
    assert messages_in(tmp_path) == []


def test_a_segment_that_cannot_be_written_leaves_frames_and_nothing_behind(tmp_path,
                                                                          monkeypatch):
    segments = _shm.Segments(str(tmp_path), threshold=10)
    real_pwrite = os.pwrite
    calls = []

    def full_after_the_first_write(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(_shm.os, "pwrite", full_after_the_first_write)
    value = [b"x" * 100, numpy.ones(50)]
    header, frames = protocol.decode(protocol.encode_value_message(
        {}, "value", value, segments.writer()))
    assert len(calls) == 2  # one leaf was written before the file system was full
    assert "shm" not in header and len(frames) == 2
    assert same(value, protocol.internalize(header["value"], frames))
    assert messages_in(tmp_path) == []


def test_a_reader_refuses_what_is_not_a_segment_of_this_user(tmp_path):
    reader = _shm.Segments(str(tmp_path)).reader(unlink=True)
    owner = _shm.own_name()
    with pytest.raises(BadMessage, match="not a segment name"):
        reader("../../etc/passwd", 0, 1)
    with pytest.raises(BadMessage, match="cannot be opened"):
        reader("modelhost-{}-{}-999".format(os.getuid(), owner), 0, 1)
    loose = tmp_path / "modelhost-{}-{}-1".format(os.getuid(), owner)
    loose.write_bytes(b"x" * 100)
    os.chmod(str(loose), 0o644)
    with pytest.raises(BadMessage, match="not an owner-only file"):
        reader(loose.name, 0, 1)
    target = tmp_path / "target"
    target.write_bytes(b"y" * 100)
    os.chmod(str(target), 0o600)
    link = tmp_path / "modelhost-{}-{}-2".format(os.getuid(), owner)
    link.symlink_to(target)
    with pytest.raises(BadMessage, match="cannot be opened"):
        reader(link.name, 0, 1)  # never followed
    os.chmod(str(loose), 0o600)
    with pytest.raises(BadMessage, match="lies outside segment"):
        reader(loose.name, 90, 11)
    assert bytes(reader(loose.name, 90, 10)) == b"x" * 10
    # A reader for one message takes only the segments the message lists.
    listed = _shm.Segments(str(tmp_path)).reader(unlink=False, allowed=["modelhost-0-1.2-3"])
    with pytest.raises(BadMessage, match="does not list"):
        listed(loose.name, 0, 10)
    # Without a reader, a reference is an error, never bytes from somewhere.
    ext = msgpack.ExtType(3, msgpack.packb([loose.name, 0, 10, None, None]))
    with pytest.raises(BadMessage, match="does not read shared memory"):
        protocol.internalize({"a": ext}, [])


def send(segments, value):
    """(header, frames) of a message carrying `value`, large leaves in `segments`."""
    return protocol.decode(protocol.encode_value_message({}, "value", value, segments.writer()))


def receive(segments, message):
    header, frames = message
    return protocol.internalize(header["value"], frames, segments.reader(unlink=True))


def inode_of(path, message):
    return os.stat(str(path / message[0]["shm"]["segments"][0])).st_ino


def test_a_released_segment_file_is_filled_again_and_a_held_one_never(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=10)
    first = send(segments, numpy.full(5000, 1.0))
    first_inode = inode_of(tmp_path, first)
    held = receive(segments, first)
    # Mapped here, so its file is not refilled: the next message gets a file of its own,
    # and what is held stays what was sent.
    second = send(segments, numpy.full(5000, 2.0))
    assert inode_of(tmp_path, second) != first_inode
    assert (held == 1.0).all()
    received = receive(segments, second)
    assert (received == 2.0).all() and (held == 1.0).all()
    del held, received  # both let go: both files free again
    third = send(segments, numpy.full(4000, 3.0))
    assert inode_of(tmp_path, third) == first_inode  # the smallest free file that fits
    assert (receive(segments, third) == 3.0).all()
    assert len([name for name in segments_in(tmp_path) if is_pool_file(name)]) == 2
    assert messages_in(tmp_path) == []


def test_a_dropped_message_frees_its_file_and_its_reference_goes_stale(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=10)
    dropped = send(segments, b"a" * 100)
    _shm.unlink_listed(str(tmp_path), dropped[0]["shm"]["segments"])  # as a broker does
    again = send(segments, b"b" * 100)
    assert inode_of(tmp_path, again) == os.stat(str(tmp_path / [
        name for name in segments_in(tmp_path) if is_pool_file(name)][0])).st_ino
    with pytest.raises(BadMessage, match="cannot be opened"):
        receive(segments, dropped)  # never the next message's bytes
    assert receive(segments, again) == b"b" * 100


def test_a_file_being_refilled_is_never_read(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=10)
    message = send(segments, b"a" * 100)
    pool = _shm_pool._pools[str(tmp_path)]
    (entry,) = pool.files
    # The owner refilling it holds the exclusive lock: a reader that opened it then refuses.
    import fcntl
    fcntl.flock(entry.fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(BadMessage, match="was reused before it was read"):
            receive(segments, message)
    finally:
        fcntl.flock(entry.fd, fcntl.LOCK_UN)
    assert receive(_shm.Segments(str(tmp_path)), message) == b"a" * 100


def test_when_every_pool_file_is_held_a_segment_is_a_file_of_its_own(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=10)
    held = [receive(segments, send(segments, numpy.full(100, float(i))))
            for i in range(_shm_pool.POOL_FILES + 2)]
    assert len([n for n in segments_in(tmp_path) if is_pool_file(n)]) == _shm_pool.POOL_FILES
    assert [float(array[0]) for array in held] == [float(i) for i in range(len(held))]
    assert messages_in(tmp_path) == []  # the two of their own were unlinked once mapped


def test_past_the_held_limit_a_pooled_payload_is_copied_out(tmp_path, monkeypatch):
    monkeypatch.setattr(_shm_pool, "HELD_MAX", 0)
    segments = _shm.Segments(str(tmp_path), threshold=10)
    first = send(segments, numpy.full(1000, 7.0))
    first_inode = inode_of(tmp_path, first)
    copied = receive(segments, first)
    # Copied while locked, then let go: the file is filled again at once, the copy stays.
    again = send(segments, numpy.full(1000, 8.0))
    assert inode_of(tmp_path, again) == first_inode
    assert (copied == 7.0).all() and (receive(segments, again) == 8.0).all()
    assert len([n for n in segments_in(tmp_path) if is_pool_file(n)]) == 1


def test_unused_pool_files_are_unlinked(tmp_path):
    segments = _shm.Segments(str(tmp_path), threshold=10)
    receive(segments, send(segments, b"x" * 100))
    assert len(segments_in(tmp_path)) == 1
    segments.trim()
    assert len(segments_in(tmp_path)) == 1  # not idle for POOL_IDLE_S yet
    _shm_pool._pools[str(tmp_path)].trim(idle_s=0.0)
    assert segments_in(tmp_path) == []


def test_names_say_whose_a_segment_is_and_the_sweep_removes_only_the_dead_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = _shm.own_name()
    uid = os.getuid()
    names = {
        "mine": "modelhost-{}-{}-5".format(uid, mine),
        "my_pool_file": "modelhost-{}-{}-p6".format(uid, mine),
        "a_dead_pool_file": "modelhost-{}-{}.1-p2".format(uid, dead.pid),
        "made_for_me": "modelhost-{}-{}-r1f-{}.3".format(uid, mine, dead.pid),
        "dead_owner": "modelhost-{}-{}.1-7".format(uid, dead.pid),
        "made_for_the_dead": "modelhost-{}-{}.1-r2-{}.1".format(uid, dead.pid, os.getpid()),
        # A recycled pid: this process's pid with another start time.
        "recycled": "modelhost-{}-{}.{}-1".format(uid, os.getpid(), int(mine.split(".")[1]) + 1),
        "other_user": "modelhost-{}-{}.1-1".format(uid + 1, dead.pid),
        "not_ours": "something-else",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"z")
    assert _shm.owner_of(names["made_for_me"]) == mine
    assert _shm.owner_of(names["other_user"]) is None
    removed = _shm.sweep(str(tmp_path))
    assert sorted(removed) == sorted(names[key] for key in (
        "dead_owner", "made_for_the_dead", "recycled", "a_dead_pool_file"))
    assert segments_in(tmp_path) == sorted(names[key] for key in (
        "mine", "my_pool_file", "made_for_me", "other_user", "not_ours"))


def test_the_schemas_take_references_and_refuse_bad_names():
    offer = {"token": "abc", "owner": "12.34", "tag": "1f"}

    def call(**shm):
        return {"v": protocol.VERSION, "op": "call", "id": 1, "model": "m", "method": "x",
                "shm": dict(dict(offer, segments=["modelhost-0-12.34-1"], bytes=10), **shm)}

    protocol.check_request(call())
    for bad in ({"owner": "../x"}, {"tag": "A/B"}, {"segments": ["/etc/passwd"]},
                {"bytes": -1}, {"segments": "modelhost-0-1.2-3"}):
        with pytest.raises(BadMessage, match="shm"):
            protocol.check_request(call(**bad))
    reply = {"kind": "result", "id": 1, "client": b"c", "shm": {"segments": ["x"]}}
    with pytest.raises(BadMessage, match="shm"):
        protocol.check_reply(reply)
