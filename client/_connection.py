"""What Client and AsyncClient share: their options, their lifecycle, and the socket to
the broker (endpoint, identity, linger, CURVE), set up here once for both.

The clients' boundary: a ZeroMQ failure (a malformed endpoint, a socket or context
closed under the client) leaves a client as a TransportError raised from the
ZeroMQ error; a reply that is not msgpack is a BadMessage (modelhost.protocol.decode).

Runs on Python >= 3.7 with pyzmq and msgpack.
"""

import enum

import zmq

from . import _curve
from . import _messages as m
from . import _shm_client
from . import local
from .errors import StateError, TransportError


class ClientState(enum.Enum):
    OPEN = "open"  # connected (ZeroMQ connects lazily; the broker may come later)
    CLOSED = "closed"  # close() was called; every method raises StateError


def open_socket(context, kind, endpoint, curve_keys, identity=None, watch=False):
    """(socket, handshake watcher or None): a socket of `kind` connected to `endpoint`,
    without linger, a CURVE client on tcp:// when there are keys; `identity` its routing
    id; `watch`: watch its handshakes, so that a silent broker can be explained."""
    try:
        socket = context.socket(kind)
    except zmq.ZMQError as exc:  # a context that was terminated
        raise transport_error("connect to", endpoint, exc) from exc
    handshake = None
    try:
        if identity is not None:
            socket.setsockopt(zmq.ROUTING_ID, identity)
        socket.setsockopt(zmq.LINGER, 0)
        _curve.secure(socket, endpoint, curve_keys)
        if watch:
            handshake = _curve.watch(socket, endpoint, curve_keys)
        socket.connect(endpoint)
    except BaseException as exc:
        _curve.close(handshake)
        socket.close(linger=0)
        if isinstance(exc, zmq.ZMQError):
            raise transport_error("connect to", endpoint, exc, "; an endpoint looks like "
                                  "ipc:///path/to/frontend.sock or tcp://host:port") from exc
        raise
    return socket, handshake


def transport_error(doing, endpoint, exc, hint=""):
    """The TransportError for the ZeroMQ error `exc` while `doing` ("send to", "receive
    from") the broker at `endpoint`; the caller raises it `from exc`."""
    return TransportError("cannot {} the broker at {}: {}{}".format(doing, endpoint, exc, hint))


class BaseClient(object):
    """The part of a client that does not depend on how it waits: options, the DEALER
    to the broker's frontend, request ids and the lifecycle.

    `curve` (for a broker over tcp:// with CURVE): None takes the key files from
    $MODELHOST_CURVE_SERVER_KEY and $MODELHOST_CURVE_CLIENT_KEY if set; False
    never uses CURVE; {"server_key": the broker's NAME.key, "client_key": this
    client's NAME.key_secret} (files written by `modelhost keys`).
    """

    # The ZeroMQ context class whose shared instance a client uses by default.
    _context_class = zmq.Context

    def __init__(self, endpoint=None, *, timeout=None, broker_timeout=10.0, context=None,
                 curve=None):
        self.endpoint = endpoint or local.default_endpoint()
        self._curve_keys = _curve.client_keys(curve)
        # Default per-call timeout in seconds (None: calls may run for ever).
        self.timeout = timeout
        # How long the broker may stay silent while we wait before the call
        # fails with BrokerUnavailable (pings are answered every heartbeat).
        self.broker_timeout = broker_timeout
        self._context = context or self._context_class.instance()
        self._socket, self._handshake = open_socket(
            self._context, zmq.DEALER, self.endpoint, self._curve_keys,
            identity=m.new_identity(), watch=True)
        self._state = ClientState.OPEN
        self._next_id = 0
        # Large payloads in shared memory (what the calls offer, write and unlink).
        self._shm = _shm_client.ClientSegments(self.endpoint, local.default_runtime_dir())

    def _check_open(self):
        if self._state is not ClientState.OPEN:
            raise StateError("this {} is {}; create a new one".format(
                type(self).__name__, self._state.value))

    def _new_id(self):
        self._check_open()
        self._next_id += 1
        return self._next_id

    def _close_socket(self):
        self._state = ClientState.CLOSED
        _curve.close(self._handshake)
        self._socket.close(linger=0)
        self._shm.close()
