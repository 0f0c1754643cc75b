"""What the blocking and the asyncio client share besides the wire (modelhost.protocol):
identities, arguments, progress, pings, the reply for a request the broker lost."""

import collections
import os
import uuid

from . import protocol
from .errors import RequestLost

# How long a client waits for the broker's own timeout reply before it gives
# up by itself: the broker answers at the deadline, this covers transit.
TIMEOUT_GRACE_S = 2.0
# After Ctrl-C, how long to wait for the daemon to confirm the cancellation.
CANCEL_GRACE_S = 2.0


class _NotSet(object):
    """The default of an option whose None means something (no timeout, no limit):
    the caller did not set it, so the client's own default or the daemon's stands."""

    __slots__ = ()

    def __repr__(self):
        return "NOT_SET"


# The one "not set" sentinel of the package (Client, AsyncClient and their helpers).
NOT_SET = _NotSet()


def new_identity():
    # Explicit identities let a restarted broker route the replies of calls
    # that were running in daemons while it was down.
    return "c-{}-{}".format(os.getpid(), uuid.uuid4().hex[:12]).encode()


def merge_arguments(arguments, kwargs):
    """Keyword arguments plus `arguments=` (for argument names the client reserves)."""
    merged = dict(arguments or {})
    merged.update(kwargs)
    return merged


def lost_reply(request_id):
    """A synthetic terminal reply for a request the broker has no record of."""
    return protocol.error_header(request_id, RequestLost(
        "the broker has no record of request {!r}: it restarted while the request was queued, "
        "or dropped a frame over its size limit; send the request again".format(request_id)))


class Progress(object):
    """A progress report, as passed to `on_progress` callbacks."""

    __slots__ = ("fraction", "stage", "message")

    def __init__(self, fraction, stage, message):
        self.fraction = fraction
        self.stage = stage
        self.message = message

    def __repr__(self):
        return "Progress(fraction={!r}, stage={!r}, message={!r})".format(
            self.fraction, self.stage, self.message)


def progress_of(header):
    return Progress(header.get("fraction"), header.get("stage"), header.get("message"))


class Pings(object):
    """Pings that keep a client alive in the broker's eyes and find requests it lost.

    Each ping has its own id and remembers which requests it asked about: a
    pong only judges those, never a request sent after its ping.
    """

    def __init__(self):
        self._asked = collections.OrderedDict()  # ping id -> request ids it asked about
        self._seq = 0

    def frames(self, request_ids):
        self._seq += 1
        ping_id = "ping-{}".format(self._seq)
        self._asked[ping_id] = set(request_ids)
        return protocol.ping_message(ping_id, sorted(request_ids, key=str))

    def lost(self, pong):
        """Request ids this pong says the broker does not know."""
        asked = set()
        # Pongs come back in order: older unanswered pings will never be.
        while self._asked:
            ping_id, ids = self._asked.popitem(last=False)
            if ping_id == pong.get("id"):
                asked = ids
                break
        if not pong.get("settled"):
            # A broker that just restarted may not know yet the calls its
            # daemons are still running: they re-register within a liveness.
            return set()
        return asked - set(pong.get("known") or [])
