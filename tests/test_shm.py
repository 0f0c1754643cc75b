"""Large payloads in shared memory (modelhost._shm): bit-exact across the threshold, owner-only,
never left behind, frames whenever shared memory cannot be used.

The unit tests encode and decode in this process; the slow ones go through a real
`modelhost up` (daemons on the host interpreter and on Python 3.7) and kill its processes
with SIGKILL mid-call. Every test has a segment directory of its own.
"""

import asyncio
import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import numpy
import pytest
import zmq

import modelhost
from conftest import ROOT, daemon_yaml, pid_alive
from modelhost import _shm, _shm_client, _shm_pool, protocol
from modelhost.broker.config import ShmConfig, daemon_spec, parse_config
from modelhost.errors import BadMessage

THRESHOLD = 100000  # the real hosts' broker.shm.threshold: odd, so that it is surely read


@pytest.fixture
def shm_dir(monkeypatch):
    """A private segment dir, also this process's clients' (MODELHOST_SHM_DIR)."""
    path = Path(tempfile.mkdtemp(prefix="mh-shm-", dir="/tmp"))
    monkeypatch.setenv("MODELHOST_SHM_DIR", str(path))
    yield path
    for name in os.listdir(str(path)):
        os.unlink(str(path / name))
    path.rmdir()


def segments_in(path):
    return sorted(os.listdir(str(path)))


def is_pool_file(name):
    return re.search(r"-p\d+$", name) is not None


def messages_in(path):
    """The segments that carry a message (not the pool files their bytes live in)."""
    return [name for name in segments_in(path) if not is_pool_file(name)]


def left_behind(path):
    """What must never remain: a message's segment, or a pool file whose owner is gone."""
    return messages_in(path) + [name for name in segments_in(path) if is_pool_file(name)
                                and not _shm.owner_alive(_shm.owner_of(name))]


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


# --- a client's side, the configuration --------------------------------------------------

def test_a_request_that_ends_without_its_result_takes_its_segments_along(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELHOST_SHM_DIR", str(tmp_path))
    client = _shm_client.ClientSegments("ipc:///nowhere/frontend.sock", "/nowhere")
    client.learn({"dir": str(tmp_path), "threshold": 10, "max_total": 2**30,
                  "tokens": {"m": _shm.token_of(str(tmp_path))}})
    offers = {}
    for request_id in (1, 2):
        offers[request_id] = client.offer(request_id)
        protocol.encode_value_message({}, "args", b"a" * 100, client.writer(request_id, "m"))
    # What a daemon wrote for each request (the reply of 1 was never sent: it died).
    daemon = _shm.Segments(str(tmp_path), threshold=10)
    for request_id, offer in offers.items():
        assert offer["token"] == daemon.token
        protocol.encode_value_message({}, "value", b"r" * 100,
                                      daemon.writer(offer["owner"], offer["tag"]))
    assert len(messages_in(tmp_path)) == 4
    client.finish(1, result=False)  # its arguments, and what was made for it
    left = messages_in(tmp_path)
    assert len(left) == 2 and all("-r{}-".format(offers[2]["tag"]) in name or
                                  _shm.owner_of(name) == _shm.own_name() for name in left)
    client.finish(2, result=True)  # its arguments; its result is the reader's to unlink
    assert len(messages_in(tmp_path)) == 1
    client.discard({"shm": {"segments": messages_in(tmp_path)}})
    assert messages_in(tmp_path) == []



def test_a_second_copy_of_a_result_leaves_the_first_its_segment(shm_dir, tmp_path):
    """A daemon resends its last results to a broker that restarted, so a client may
    have two copies of one result (same segment) before it reads either: dropping the
    second must not unlink what the first is about to map."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)  # stands in for the broker, on real sockets
    endpoint = "ipc://{}/frontend.sock".format(tmp_path)
    router.bind(endpoint)
    try:
        with modelhost.Client(endpoint) as client:
            stream = client.stream("probe", "echo", timeout=30)  # sent; nothing read yet
            frames = router.recv_multipart()
            header, _ = protocol.decode(frames[1:])
            offer = header["shm"]
            daemon = _shm.Segments(str(shm_dir), threshold=THRESHOLD)
            data = numpy.arange(THRESHOLD, dtype="<f8")
            reply = protocol.result_reply(header["id"], data, None, None,
                                          daemon.writer(offer["owner"], offer["tag"]))
            assert "shm" in protocol.decode_header(reply[0])
            for _ in range(2):
                router.send_multipart([frames[0]] + reply)
            wait_until(lambda: client._socket.poll(0), "the copies to arrive")
            time.sleep(0.2)  # both in the client's queue, so one drain takes both
            with pytest.raises(StopIteration):
                next(stream)
            assert same(data, stream.result)
        assert left_behind(shm_dir) == []
    finally:
        context.destroy(linger=0)

def test_endpoints_on_this_host():
    for endpoint in ("ipc:///run/x.sock", "tcp://127.0.0.1:5555", "tcp://localhost:1",
                     "tcp://[::1]:5555"):
        assert _shm_client.endpoint_is_local(endpoint), endpoint
    for endpoint in ("tcp://10.0.0.2:5555", "tcp://gpu-box:5555", "tcp://[fe80::1]:1"):
        assert not _shm_client.endpoint_is_local(endpoint), endpoint


def test_a_remote_broker_gets_frames_and_no_offer(caplog):
    caplog.set_level(logging.INFO, logger="modelhost.shm")
    client = _shm_client.ClientSegments("tcp://10.1.2.3:5555", "/nowhere")
    assert client.offer(1) is None and client.writer(1, "m") is None
    assert not client.needs_info("m", {"data": b"x" * 2**20})
    assert any("travel as frames: the broker is on another host" in r.getMessage()
               for r in caplog.records)


def test_config_keys(tmp_path):
    base = "daemons:\n  a:\n    engine: x:Y\n    python: /usr/bin/python3\n    venv: false\n"
    assert parse_config(base).broker.shm == ShmConfig()
    assert ShmConfig().threshold == _shm.DEFAULT_THRESHOLD and ShmConfig().dir is None
    config = parse_config(base + textwrap.dedent("""\
        broker:
          runtime_dir: {}
          shm: {{threshold: 64KiB, max_total: 2GiB, dir: {}}}
        """.format(tmp_path / "run", tmp_path / "seg")))
    assert config.broker.shm == ShmConfig(threshold=64 * 2**10, max_total=2 * 2**30,
                                          dir=tmp_path / "seg")
    assert daemon_spec(config, "a")["shm"] == {"dir": str(tmp_path / "seg"),
                                               "threshold": 65536, "max_total": 2**31}
    off = parse_config(base + "broker:\n  shm: {threshold: off}\n")
    assert off.broker.shm.threshold is None
    with pytest.raises(Exception, match=r"broker\.shm\.max_total: expected a size"):
        parse_config(base + "broker:\n  shm: {max_total: lots}\n")
    with pytest.raises(Exception, match=r"broker\.shm\.treshold: unknown key; did you mean"):
        parse_config(base + "broker:\n  shm: {treshold: 1MiB}\n")


def test_the_broker_takes_references_only_from_clients_on_its_host():
    from types import SimpleNamespace

    from modelhost.broker.broker import Broker

    class Frame(object):
        def __init__(self, peer):
            self.peer = peer

        def get(self, name):
            assert name == "Peer-Address"
            return self.peer

    def on_this_host(frontend, peer):
        broker = SimpleNamespace(config=SimpleNamespace(broker=SimpleNamespace(
            frontend=frontend)))
        return Broker._on_this_host(broker, Frame(peer))

    assert on_this_host("ipc:///run/x/frontend.sock", "localhost:0:0:42")
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert on_this_host("tcp://127.0.0.1:5555", peer), peer
    for peer in ("10.0.0.5", "192.168.1.2", "fe80::1", ""):
        assert not on_this_host("tcp://0.0.0.0:5555", peer), peer


# --- through a real `modelhost up` ----------------------------------------------------------

def shm_host(make_host, shm_dir, daemons, **settings):
    broker = {"shm": "{{threshold: {}, dir: {}}}".format(THRESHOLD, shm_dir)}
    broker.update(settings)
    return make_host(daemons, broker).start()


def owners(value):
    """The type of the object each array's bytes live in (mmap: shared memory)."""
    found = {}
    for key, item in value.items():
        if isinstance(item, numpy.ndarray):
            base = item
            while getattr(base, "base", None) is not None:
                base = base.base
            found[key] = type(getattr(base, "obj", base)).__name__
    return found


@pytest.mark.slow
def test_round_trips_through_a_real_host_and_a_python_3_7_daemon(make_host, shm_dir,
                                                                 test_venvs):
    host = shm_host(make_host, shm_dir, [daemon_yaml("new"), daemon_yaml(
        "old", test_venvs["py37"])])
    host.wait_ready("new", "old")
    client = host.client()
    values = payloads(THRESHOLD)
    for name in ("new", "old"):
        echoed = client.call(name, "echo", data=values)["data"]
        assert same(values, echoed), name
        # Over the threshold both ways in shared memory, under it in frames.
        came = owners(echoed)
        assert came["u1_over"] == came["u1_at"] == came["f4"] == came["zero_d_big"] == "mmap"
        assert came["u1_under"] == "Frame" and came["zero_d_small"] == "Frame"
        seen = client.call(name, "payload_owners", over=values["u1_over"],
                           at=values["structured"], under=values["u1_under"])
        assert seen == {"over": "mmap", "at": "mmap", "under": "Frame"}, name
        assert left_behind(shm_dir) == []
    assert client.call("old", "info")["python"].startswith("3.7.")
    # A streamed chunk comes the same way.
    chunks = list(client.stream("old", "count", n=3, size=THRESHOLD + 5))
    assert [c["blob"] for c in chunks] == [bytes([i]) * (THRESHOLD + 5) for i in range(3)]
    assert left_behind(shm_dir) == []


@pytest.mark.slow
def test_a_new_clients_first_large_call_to_a_settled_broker(make_host, shm_dir):
    # The client asks the broker (`ps`) before its first large call, and pings while it
    # waits: the call it has not sent yet must not be in that ping, or a broker that has
    # been up a while would call it lost.
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    host.wait_for(lambda status: status["broker"]["uptime_s"] > 3.0, what="a settled broker")
    for client in (host.client(), host.client()):
        data = numpy.arange(THRESHOLD, dtype="<i8")
        echoed = client.call("probe", "echo", data=data)["data"]
        assert same(data, echoed) and owners({"v": echoed})["v"] == "mmap"


@pytest.mark.slow
def test_a_daemon_maps_only_the_segments_its_call_lists(make_host, shm_dir):
    import zmq

    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    segments = _shm.Segments(str(shm_dir), threshold=10)
    frames = protocol.call_message(1, "probe", "echo", {"data": b"s" * 100},
                                   writer=segments.writer())
    header = msgpack.unpackb(frames[0], raw=False)
    (name,) = header.pop("shm")["segments"]  # as the broker strips it from another host
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(host.endpoint)
    try:
        socket.send_multipart([msgpack.packb(header, use_bin_type=True)] + frames[1:])
        assert socket.poll(30000)
        reply, _ = protocol.decode(socket.recv_multipart())
    finally:
        socket.close(0)
    assert reply["kind"] == "error" and reply["code"] == "bad_message", reply
    assert "does not list" in reply["message"]
    assert name in messages_in(shm_dir)  # not mapped, not unlinked: still its owner's
    _shm.unlink_listed(str(shm_dir), [name])


@pytest.mark.slow
def test_the_async_client_round_trips_through_shared_memory(make_host, shm_dir):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    values = payloads(THRESHOLD)

    async def main():
        async with modelhost.AsyncClient(host.endpoint) as client:
            echoed = (await client.call("probe", "echo", data=values))["data"]
            chunks = [c async for c in client.stream("probe", "count", n=2,
                                                     size=THRESHOLD * 2)]
            return echoed, chunks

    echoed, chunks = asyncio.run(main())
    assert same(values, echoed) and owners(echoed)["u1_over"] == "mmap"
    assert [c["blob"] for c in chunks] == [bytes([i]) * THRESHOLD * 2 for i in range(2)]
    assert left_behind(shm_dir) == []


@pytest.mark.slow
def test_frames_when_shared_memory_is_off_or_not_shared(make_host, shm_dir, monkeypatch,
                                                        caplog):
    caplog.set_level(logging.INFO, logger="modelhost.shm")
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    off = make_host([daemon_yaml("probe")], {"shm": "{threshold: off}"}).start()
    host.wait_ready("probe")
    off.wait_ready("probe")
    values = payloads(THRESHOLD)
    echoed = off.client().call("probe", "echo", data=values)["data"]
    assert same(values, echoed) and owners(echoed)["u1_over"] == "Frame"
    assert any("shared memory is off in the broker's configuration" in r.getMessage()
               for r in caplog.records)
    # A client whose segment dir is not the daemon's: frames both ways, bit-exact.
    elsewhere = Path(tempfile.mkdtemp(prefix="mh-shm-other-", dir="/tmp"))
    monkeypatch.setenv("MODELHOST_SHM_DIR", str(elsewhere))
    try:
        echoed = host.client().call("probe", "echo", data=values)["data"]
        assert same(values, echoed) and owners(echoed)["u1_over"] == "Frame"
        assert segments_in(elsewhere) == [] and segments_in(shm_dir) == []
    finally:
        elsewhere.rmdir()
    assert any("does not share this client's shared-memory directory" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_the_daemon_limit_counts_what_comes_in_shared_memory(make_host, shm_dir):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe", max_payload="1MiB")],
                    max_reply="2MiB")
    host.wait_ready("probe")
    with pytest.raises(modelhost.PayloadTooLarge):
        host.client().call("probe", "echo", data=numpy.zeros(2**20 + 8, dtype=numpy.uint8))
    assert left_behind(shm_dir) == []
    # The broker's frame cap on replies is for frames: a reply in shared memory does not
    # pass through the broker's socket.
    chunks = list(host.client().stream("probe", "count", n=2, size=3 * 2**20))
    assert [len(chunk["blob"]) for chunk in chunks] == [3 * 2**20] * 2
    assert left_behind(shm_dir) == []


@pytest.mark.slow
def test_a_result_that_comes_after_the_timeout_is_unlinked_by_the_broker(make_host, shm_dir,
                                                                        tmp_path):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    client = host.client()
    release = tmp_path / "release"
    data = numpy.ones(THRESHOLD * 3, dtype=numpy.uint8)
    with pytest.raises(modelhost.Timeout):
        client.call("probe", "echo_after", data=data, path=str(release), timeout=0.5)
    assert left_behind(shm_dir) == []  # the daemon unlinked the arguments once mapped
    release.touch()
    # The daemon writes the late result for this (live) client; the broker drops the
    # reply and unlinks it.
    host.wait_for(lambda status: all(d["state"] == "ready" for d in status["daemons"]),
                  what="the late call to end")
    wait_until(lambda: left_behind(shm_dir) == [], "the late result's segment to go")
    assert client.call("probe", "add", a=1) == 1


def wait_until(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def call_in_thread(client, method, **arguments):
    """(thread, outcome) of a call of the probe daemon's `method` made in a thread:
    outcome gets "value" or "error" once it ends."""
    outcome = {}

    def call():
        try:
            outcome["value"] = client.call("probe", method, **arguments)
        except modelhost.ModelhostError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    return thread, outcome


CLIENT_SCRIPT = """
import sys, numpy, modelhost
client = modelhost.Client(sys.argv[1])
print("calling", flush=True)
client.call("probe", "echo_after", data=numpy.ones({size}, dtype=numpy.uint8), path=sys.argv[2])
"""


@pytest.mark.slow
def test_kill_9_of_the_client_mid_call_leaves_no_segment(make_host, shm_dir, tmp_path):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe", concurrency=1, max_queue=4)])
    host.wait_ready("probe")
    running, queued = tmp_path / "running", tmp_path / "queued"
    script = CLIENT_SCRIPT.format(size=THRESHOLD * 4)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    clients = []
    # One call running in the daemon (its arguments mapped), one queued in the broker
    # (its arguments still the client's): both clients killed.
    for path in (running, queued):
        clients.append(subprocess.Popen([sys.executable, "-c", script, host.endpoint, str(path)],
                                        env=env, stdout=subprocess.PIPE))
        assert clients[-1].stdout.readline().strip() == b"calling"
        if path is running:
            host.wait_for(lambda status: status["daemons"][0]["state"] == "busy",
                          what="the first call to run")
    wait_until(lambda: len(messages_in(shm_dir)) == 1, "the queued call's segment")
    for process in clients:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    running.touch()  # the daemon writes a result for a dead client
    queued.touch()
    wait_until(lambda: left_behind(shm_dir) == [], "the dead clients' segments to be swept")
    host.wait_for(lambda status: status["daemons"][0]["state"] == "ready",
                  what="the daemon to be idle")
    assert left_behind(shm_dir) == []
    assert host.client().call("probe", "add", a=2) == 2


@pytest.mark.slow
def test_kill_9_of_the_broker_mid_call_leaves_no_segment(make_host, shm_dir, tmp_path):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    broker_pid = host.ps()["broker"]["pid"]
    client = host.client(broker_timeout=60.0)
    release = tmp_path / "release"
    data = numpy.arange(THRESHOLD, dtype="<f8")
    thread, outcome = call_in_thread(client, "echo_after", data=data, path=str(release))
    host.wait_for(lambda status: status["daemons"][0]["state"] == "busy", what="the call")
    os.kill(broker_pid, signal.SIGKILL)
    host.wait_for(lambda status: status["broker"]["pid"] != broker_pid
                  and status["daemons"][0]["state"] == "busy", what="a new broker")
    release.touch()
    thread.join(60)
    assert not thread.is_alive()
    # The daemon re-registered with the call, so its result (in shared memory) reached us.
    assert "error" not in outcome, outcome
    assert same(data, outcome["value"]) and owners({"v": outcome["value"]})["v"] == "mmap"
    wait_until(lambda: left_behind(shm_dir) == [], "no segment left")


@pytest.mark.slow
def test_kill_9_of_the_daemon_mid_call_leaves_no_segment(make_host, shm_dir, tmp_path):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    client = host.client()
    pid = client.call("probe", "info")["pid"]
    # A large result first, so that the daemon holds a pooled segment file when it dies.
    client.call("probe", "echo", data=numpy.ones(THRESHOLD, numpy.uint8))
    assert any(is_pool_file(name) and _shm.owner_of(name).startswith("{}.".format(pid))
               for name in segments_in(shm_dir))
    thread, outcome = call_in_thread(client, "echo_after", path=str(tmp_path / "never"),
                                     data=numpy.ones(THRESHOLD * 2, numpy.uint8))
    host.wait_for(lambda status: status["daemons"][0]["state"] == "busy", what="the call")
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), modelhost.DaemonCrashed), outcome
    assert not pid_alive(pid)
    assert left_behind(shm_dir) == []
    host.wait_ready("probe")
    echoed = client.call("probe", "echo", data=numpy.ones(THRESHOLD, numpy.uint8))["data"]
    assert owners({"v": echoed})["v"] == "mmap"
    assert left_behind(shm_dir) == []


@pytest.mark.slow
def test_a_daemon_that_dies_right_after_writing_a_chunk_leaves_no_segment(make_host, shm_dir):
    host = shm_host(make_host, shm_dir, [daemon_yaml("probe")])
    host.wait_ready("probe")
    client = host.client()
    for _ in range(3):
        chunks = []
        with pytest.raises(modelhost.DaemonCrashed):
            for chunk in client.stream("probe", "crash_after_chunk", size=THRESHOLD * 8):
                chunks.append(chunk)
        assert chunks in ([], [b"c" * THRESHOLD * 8])
        # Sent or not, the chunk's segment is gone: mapped and unlinked, or found by the
        # request's tag when the request ended without a result.
        assert left_behind(shm_dir) == []
        host.wait_ready("probe")
