"""Binary values in payload frames: the codec under every message that carries a value.

A value (a call's arguments, a reply's value) travels in the header as
msgpack, except its binary leaves: each bytes-like value and each numpy
array moves to a frame of its own after the header, and the header holds an
msgpack extension value naming that frame. So megabytes of audio or video are
never copied into msgpack, and a receiver gets a numpy array as a read-only
view on the frame it arrived in. A leaf over the shared-memory threshold may
instead go into a segment (see _shm.py): the header then holds a reference to
where it lies there, and the receiver maps it. `modelhost.protocol`
re-exports externalize() and internalize(); nothing else uses this module.

This module runs on Python 3.7 with only msgpack (numpy is used when a value
is an array and numpy is importable).
"""

import sys
import threading

import msgpack

from .errors import BadMessage

# msgpack extension codes for values that live in payload frames.
_EXT_BYTES = 1  # data: msgpack int, the frame index
_EXT_ARRAY = 2  # data: msgpack [frame index, numpy dtype str, shape]
# A leaf in a shared-memory segment (see _shm.py): [segment name, offset, size,
# numpy dtype or None for bytes, shape or None].
_EXT_SHM = 3

_BINARY_TYPES = (bytes, bytearray, memoryview)


_numpy_lock = threading.Lock()
_numpy_whole = None  # the numpy module, once seen fully imported


def _numpy():
    # Only a numpy that someone already imported: a value cannot be an array
    # otherwise, and the broker and numpy-less daemons never import it.
    global _numpy_whole
    numpy = sys.modules.get("numpy")
    if numpy is None or numpy is _numpy_whole:
        return numpy
    if getattr(getattr(numpy, "__spec__", None), "_initializing", False):
        # Another thread is importing it (a call's first array on another
        # slot, an engine's load): until it is done its attributes are
        # missing, so wait for it.
        return _import_numpy()
    _numpy_whole = numpy
    return numpy


def _import_numpy():
    """numpy, imported whole, or None where it is not installed.

    One import at a time: a slot thread must never see the module another
    one is still importing.
    """
    with _numpy_lock:
        try:
            import numpy
        except ImportError:
            return None
    return numpy


def _dtype_to_wire(dtype):
    # Structured dtypes need their fields; dtype.str would flatten them to |V<n>.
    return dtype.descr if dtype.fields is not None else dtype.str


def _dtype_from_wire(numpy, spec):
    if isinstance(spec, list):
        spec = [tuple(tuple(part) if isinstance(part, list) else part for part in field)
                for field in spec]
    return numpy.dtype(spec)


def externalize(value, frames, place=None):
    """`value` with every binary leaf moved into `frames` and replaced by a reference.

    `place` (a shared-memory Writer's) takes a leaf's bytes and returns where in a
    segment it goes, or None to leave it to a frame.
    """
    if isinstance(value, _BINARY_TYPES):
        where = None if place is None else place(value)
        if where is not None:
            return msgpack.ExtType(_EXT_SHM, msgpack.packb(where + [None, None]))
        frames.append(value)
        return msgpack.ExtType(_EXT_BYTES, msgpack.packb(len(frames) - 1))
    if isinstance(value, dict):
        return {key: externalize(item, frames, place) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [externalize(item, frames, place) for item in value]
    numpy = _numpy()
    if numpy is not None:
        if isinstance(value, numpy.ndarray):
            if value.dtype.hasobject:
                raise TypeError("arrays of Python objects cannot be sent; use a numeric dtype")
            # A flat uint8 view carries any dtype (datetime64, structured, ...)
            # as raw bytes, without a copy when the array is contiguous.
            data = numpy.ascontiguousarray(value).reshape(-1).view(numpy.uint8)
            where = None if place is None or not data.size else place(memoryview(data))
            if where is not None:
                meta = where + [_dtype_to_wire(value.dtype), list(value.shape)]
                return msgpack.ExtType(_EXT_SHM, msgpack.packb(meta))
            frames.append(memoryview(data) if data.size else b"")
            meta = [len(frames) - 1, _dtype_to_wire(value.dtype), list(value.shape)]
            return msgpack.ExtType(_EXT_ARRAY, msgpack.packb(meta))
        if isinstance(value, numpy.generic):
            return value.item()  # numpy scalars travel as plain msgpack values
    return value


def internalize(value, frames, segment=None):
    """The inverse of externalize: references replaced by bytes or numpy arrays.

    `segment(name, offset, size)` (a shared-memory Reader) maps what lies in a
    segment; without one, a shared-memory reference is a BadMessage.
    """
    if isinstance(value, msgpack.ExtType):
        return _resolve(value, frames, segment)
    if isinstance(value, dict):
        return {key: internalize(item, frames, segment) for key, item in value.items()}
    if isinstance(value, list):
        return [internalize(item, frames, segment) for item in value]
    return value


def _frame_at(frames, index):
    if not isinstance(index, int) or not 0 <= index < len(frames):
        raise BadMessage("a value refers to payload frame {!r}, but the message has {} "
                         "payload frames".format(index, len(frames)))
    return frames[index]


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _resolve(ext, frames, segment):
    try:
        meta = msgpack.unpackb(ext.data, raw=False)
    except Exception as exc:
        raise BadMessage("a payload reference is not valid msgpack") from exc
    if ext.code == _EXT_BYTES:
        frame = _frame_at(frames, meta)
        return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    if ext.code == _EXT_ARRAY:
        if not (isinstance(meta, list) and len(meta) == 3):
            raise BadMessage("an array reference must be [frame, dtype, shape]")
        index, dtype, shape = meta
        return _array(_buffer(_frame_at(frames, index)), dtype, shape)
    if ext.code == _EXT_SHM:
        if not (isinstance(meta, list) and len(meta) == 5):
            raise BadMessage("a shared-memory reference must be [segment, offset, size, dtype, "
                             "shape]")
        if segment is None:
            raise BadMessage("a payload in shared memory reached a peer that does not read "
                             "shared memory here")
        name, offset, size, dtype, shape = meta
        # A view on the mapped segment (read-only); bytes are copied, as from a frame.
        view = segment(name, offset, size)
        return bytes(view) if dtype is None else _array(view, dtype, shape)
    raise BadMessage("unknown payload reference type {}".format(ext.code))


def _array(buffer, dtype, shape):
    numpy = _import_numpy()
    if numpy is None:
        # No numpy here: hand over the raw data with what is needed to rebuild it.
        return {"dtype": dtype, "shape": shape, "data": bytes(buffer)}
    try:
        # Zero-copy view on the received frame or segment (read-only).
        array = numpy.frombuffer(buffer, dtype=_dtype_from_wire(numpy, dtype))
        return array.reshape(shape)
    except (TypeError, ValueError) as exc:
        raise BadMessage("array payload does not match its dtype {} and shape {}: {}"
                         .format(dtype, shape, exc)) from exc
