"""A client's side of shared memory (see _shm.py): what it offers, when it asks, what it
unlinks. Used by Client and AsyncClient alike."""

import logging
import os
import threading
import time

from ._shm import (DEFAULT_MAX_TOTAL, Segments, default_dir, made_for, new_tag, own_name,
                   say_once, unlink_listed)

# A client asks the broker where its daemons stand (`ps`) only for a call that has
# a leaf at least this big: below it, frames cost less than the ask.
ASK_FROM = 64 * 1024
# ...and asks again about a daemon it has not heard of at most this often.
ASK_AGAIN_S = 5.0


def endpoint_is_local(endpoint):
    """Whether a broker endpoint is on this machine: ipc://, or tcp:// on loopback."""
    if endpoint.startswith("ipc://") or endpoint.startswith("inproc://"):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


class ClientSegments(object):
    """What one client does with shared memory.

    Every call from a client on the broker's machine offers to take its reply's
    large leaves in shared memory (`offer`: this client's directory token, owner
    name and a tag for the request), which costs the daemon nothing to refuse.
    The client's own large leaves go into shared memory only toward a daemon
    that the broker says shares the client's directory (`writer`: one `ps`
    per client, for the first call with a large leaf, gives every daemon's
    token and the configured threshold and cap).
    """

    def __init__(self, endpoint, runtime_dir):
        self.local = endpoint_is_local(endpoint)
        self.endpoint = endpoint
        self.segments = None
        if self.local:
            self.segments = Segments(default_dir(runtime_dir), None)
            if self.segments.token is None:
                say_once(("dir", self.segments.directory), logging.INFO,
                         "large payloads travel as frames: no usable shared-memory directory "
                         "(%s)", self.segments.directory)
                self.segments = None
            elif _once_per_process(("swept", self.segments.directory)):
                self.segments.sweep()
        else:
            say_once(("remote", endpoint), logging.INFO, "large payloads to and from %s "
                     "travel as frames: the broker is on another host", endpoint)
        self.info = None  # the broker's status()["broker"]["shm"]
        self.asked_at = None
        self.sending = None  # Segments with the broker's threshold and cap, once known
        self.requests = {}  # request id -> (tag, Writer or None)

    def offer(self, request_id):
        """The call header's "shm" field: the offer to take the reply in shared memory."""
        if self.segments is None:
            return None
        tag = new_tag()
        self.requests[request_id] = (tag, None)
        return {"token": self.segments.token, "owner": own_name(), "tag": tag}

    def needs_info(self, model, value):
        """Whether to ask the broker before building a call with these arguments."""
        if self.segments is None or not _largest_leaf(value, ASK_FROM):
            return False
        if self.info is None:
            return True
        known = model in (self.info.get("tokens") or {})
        return not known and time.monotonic() - self.asked_at > ASK_AGAIN_S

    def learn(self, info):
        """The broker's "shm" status, or None when asking failed."""
        self.asked_at = time.monotonic()
        if info is None:
            return
        self.info = info
        self.sending = None
        if info.get("threshold") is None:
            say_once(("off", self.endpoint), logging.INFO, "large payloads travel as frames: "
                     "shared memory is off in the broker's configuration (broker.shm)")
        else:
            self.sending = Segments(self.segments.directory, info["threshold"],
                                    info.get("max_total", DEFAULT_MAX_TOTAL))

    def writer(self, request_id, model):
        """A Writer for this call's arguments, None when they go as frames."""
        if self.sending is None:
            return None
        tokens = self.info.get("tokens") or {}
        if tokens.get(model) != self.sending.token:
            if model in tokens:
                say_once(("peer", model), logging.INFO, "large payloads to daemon %s travel "
                         "as frames: it does not share this client's shared-memory directory "
                         "%s (another host or user, shared memory off there, or another "
                         "broker.shm.dir)", model, self.sending.directory)
            return None
        writer = self.sending.writer()
        tag = self.requests.get(request_id, (None, None))[0]
        self.requests[request_id] = (tag, writer)
        return writer

    def reader(self, header):
        """The Reader for a reply's value: the segments its header lists, unlinked once mapped."""
        if self.segments is None:
            return None
        return self.segments.reader(True, (header.get("shm") or {}).get("segments") or ())

    def finish(self, request_id, result):
        """The request is over: unlink its arguments' segments and, when it ended without
        a result, whatever a daemon made for it that never arrived."""
        tag, writer = self.requests.pop(request_id, (None, None))
        if writer is not None:
            writer.discard()
        if tag is not None and not result:
            unlink_listed(self.segments.directory, made_for(self.segments.directory, tag))

    def discard(self, header, keep=None):
        """A reply nobody waits for: unlink the segments it brought, but none that the
        reply `keep` (being read) lists too: a copy of a reply names the same segments."""
        names = _listed(header)
        if self.segments is not None and names:
            kept = set(_listed(keep)) if keep is not None else ()
            unlink_listed(self.segments.directory, [name for name in names if name not in kept])

    def close(self):
        for request_id in list(self.requests):
            self.finish(request_id, False)
        if self.segments is not None:
            self.segments.trim()


def _listed(header):
    """The segment names a reply's header lists (none for a malformed list)."""
    shm = header.get("shm")
    if isinstance(shm, dict) and isinstance(shm.get("segments"), list):
        return shm["segments"]
    return []


_done_once = set()
_done_lock = threading.Lock()


def _once_per_process(key):
    key = (os.getpid(), key)
    with _done_lock:
        if key in _done_once:
            return False
        _done_once.add(key)
        return True


def _largest_leaf(value, minimum, depth=0):
    """Whether `value` holds a binary leaf or array of at least `minimum` bytes."""
    if isinstance(value, (bytes, bytearray)):
        return len(value) >= minimum
    if isinstance(value, memoryview):
        return value.nbytes >= minimum
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, (list, tuple)):
        return getattr(value, "nbytes", 0) >= minimum if hasattr(value, "dtype") else False
    if depth > 32:
        return False
    return any(_largest_leaf(item, minimum, depth + 1) for item in value)
