"""CURVE on a client's sockets: which keys, and why a broker over tcp stays silent.

A broker with `broker.curve` configured is a CURVE server on every tcp://
endpoint it binds; ipc:// stays plain (file permissions guard it). So a
client uses its keys for tcp:// endpoints only, and needs nothing to know
about the broker's configuration beyond its public key.

Keys are the certificate files `modelhost keys` writes (zmq.auth's format):
the server's NAME.key (public) and this client's NAME.key_secret.
"""

import itertools
import os
import time

import zmq
import zmq.auth

SERVER_KEY_ENV = "MODELHOST_CURVE_SERVER_KEY"
CLIENT_KEY_ENV = "MODELHOST_CURVE_CLIENT_KEY"

# Monitor events of a failed or finished handshake (libzmq >= 4.3).
_EVENTS = {name: getattr(zmq, "EVENT_" + name, 0) for name in (
    "HANDSHAKE_SUCCEEDED", "HANDSHAKE_FAILED_AUTH", "HANDSHAKE_FAILED_PROTOCOL",
    "HANDSHAKE_FAILED_NO_DETAIL")}
_monitors = itertools.count()  # numbers the monitors' inproc addresses
# Plain ints, checked before every send: enums cost more (see protocol.readable).
_EVENTS_OPTION = int(zmq.EVENTS)
_POLLOUT = int(zmq.POLLOUT)


class CurveKeys(object):
    """A client's CURVE key pair and the server's public key (z85 bytes)."""

    def __init__(self, server_public, client_public, client_secret, client_file):
        self.server_public = server_public
        self.client_public = client_public
        self.client_secret = client_secret
        self.client_file = client_file  # for messages


def client_keys(curve=None):
    """The keys a client connects with, or None for no CURVE.

    `curve`: None takes $MODELHOST_CURVE_SERVER_KEY and $MODELHOST_CURVE_CLIENT_KEY
    (no CURVE when neither is set); False: no CURVE; a mapping
    {"server_key": the broker's NAME.key, "client_key": this client's NAME.key_secret}.
    Raises ValueError (or OSError for a file that cannot be read) naming what is wrong.
    """
    if curve is False:
        return None
    if curve is None:
        server, client = os.environ.get(SERVER_KEY_ENV), os.environ.get(CLIENT_KEY_ENV)
        if not server and not client:
            return None
        names = (SERVER_KEY_ENV, CLIENT_KEY_ENV)
    else:
        try:
            server, client = curve.get("server_key"), curve.get("client_key")
            unknown = sorted(set(curve) - {"server_key", "client_key"})
        except AttributeError:
            raise ValueError("curve: expected a mapping {{'server_key': PATH, 'client_key': "
                             "PATH}}, got {!r}".format(curve))
        if unknown:
            raise ValueError("curve: unknown key(s) {}; expected server_key and client_key"
                             .format(", ".join(map(repr, unknown))))
        names = ("curve['server_key']", "curve['client_key']")
    for value, name in ((server, names[0]), (client, names[1])):
        if not value:
            raise ValueError("{} is not set: a CURVE client needs the broker's public key "
                             "(its NAME.key) and its own NAME.key_secret, both written by "
                             "`modelhost keys`".format(name))
    server_public, _ = _load(server, names[0])
    client_public, client_secret = _load(client, names[1])
    if client_secret is None:
        raise ValueError("{}: {} holds only a public key; give this client's NAME.key_secret"
                         .format(names[1], client))
    return CurveKeys(server_public, client_public, client_secret, str(client))


def _load(path, name):
    try:
        return zmq.auth.load_certificate(os.path.expanduser(os.fspath(path)))
    except OSError as exc:
        raise OSError("{}: cannot read {}: {}".format(name, path, exc))
    except ValueError:
        raise ValueError("{}: {} is not a CURVE certificate (expected a file written by "
                         "`modelhost keys`)".format(name, path))


def secure(socket, endpoint, keys):
    """Make `socket` a CURVE client of a tcp:// endpoint when there are keys; before connect."""
    if keys is not None and endpoint.startswith("tcp://"):
        socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)


def watch(socket, endpoint, keys):
    """A Handshake watcher for a socket to a tcp:// endpoint (None for others); before connect."""
    return Handshake(socket, endpoint, keys) if endpoint.startswith("tcp://") else None


class Handshake(object):
    """Watches a tcp socket's handshakes, so that silence can be explained.

    A broker that refuses a key, or wants CURVE from a client without it,
    drops the connection during the handshake: the client sees no reply,
    only these monitor events.
    """

    def __init__(self, socket, endpoint, keys):
        self.endpoint = endpoint
        self.keys = keys
        self.failures = set()  # names of the handshake failures since the last success
        # Unique for good: libzmq may unbind an old monitor's address only later.
        address = "inproc://modelhost-handshake-{}-{}".format(os.getpid(), next(_monitors))
        socket.monitor(address, sum(set(_EVENTS.values())))
        # A plain socket on the same underlying context, also for an asyncio one:
        # it is only read without blocking.
        self._context = zmq.Context.shadow(socket.context.underlying)
        self._monitor = self._context.socket(zmq.PAIR)
        self._monitor.setsockopt(zmq.LINGER, 0)
        self._monitor.connect(address)
        self._socket = socket

    def problem(self):
        """Why the broker is silent, if a handshake said so; else None."""
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor is not None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            for name, value in _EVENTS.items():
                if value and event["event"] == value:
                    if name == "HANDSHAKE_SUCCEEDED":
                        self.failures.clear()
                    else:
                        self.failures.add(name)
        if "HANDSHAKE_FAILED_AUTH" in self.failures:
            return ("the broker at {} refused this client's CURVE key (from {}): its public "
                    "key is not among the broker's authorized keys; copy the matching NAME.key "
                    "into the broker's broker.curve.authorized_keys directory".format(
                        self.endpoint, self.keys.client_file if self.keys else "nowhere"))
        if "HANDSHAKE_FAILED_PROTOCOL" in self.failures and self.keys is None:
            return ("the broker at {} wants CURVE authentication: set {} to its public key "
                    "and {} to this client's key_secret (see `modelhost keys`)".format(
                        self.endpoint, SERVER_KEY_ENV, CLIENT_KEY_ENV))
        if self.failures:
            if self.keys is not None:
                return ("the CURVE handshake with {} failed: is the server key this client "
                        "uses the broker's public key, and does the broker have "
                        "broker.curve configured?".format(self.endpoint))
            return "the handshake with {} failed".format(self.endpoint)
        return None

    def raise_if_refused(self, deadline):
        """Raise BrokerUnavailable once the broker refused the key (libzmq does not try
        again then) or wants CURVE from a client that has no keys (no retry can fix
        that), or at `deadline`; other failures may pass as libzmq reconnects."""
        from .errors import BrokerUnavailable

        problem = self.problem()
        if "HANDSHAKE_FAILED_AUTH" in self.failures or (
                "HANDSHAKE_FAILED_PROTOCOL" in self.failures and self.keys is None):
            raise BrokerUnavailable(problem)
        if time.monotonic() > deadline:
            raise BrokerUnavailable(problem or "cannot send to the broker at {}: no connection "
                                    "takes messages; is `modelhost up` running?"
                                    .format(self.endpoint))

    def explain(self, message):
        """`message`, with the handshake's reason when there is one."""
        problem = self.problem()
        return message if problem is None else "{}: {}".format(message.split(";")[0], problem)

    def close(self):
        if self._monitor is not None:
            try:
                self._socket.disable_monitor()
            except zmq.ZMQError:
                pass  # the socket is closed already
            self._monitor.close(linger=0)
            self._monitor = None


def wait_to_send(handshake, socket, timeout):
    """Before a send on a tcp socket: wait until it can go, or raise BrokerUnavailable.

    A broker that refuses the handshake makes libzmq drop the connection for good:
    a send would then wait for ever for a peer that never comes.
    """
    if handshake is None:
        return
    deadline = time.monotonic() + timeout
    while not socket.getsockopt(_EVENTS_OPTION) & _POLLOUT:
        handshake.raise_if_refused(deadline)
        socket.poll(100, zmq.POLLOUT)


async def wait_to_send_async(handshake, socket, timeout):
    """wait_to_send for an asyncio socket."""
    if handshake is None:
        return
    deadline = time.monotonic() + timeout
    while not socket.getsockopt(_EVENTS_OPTION) & _POLLOUT:
        handshake.raise_if_refused(deadline)
        await socket.poll(100, zmq.POLLOUT)


def writable(handshake, socket):
    """Whether a send on the socket goes at once (always, for a socket not watched)."""
    return handshake is None or bool(socket.getsockopt(_EVENTS_OPTION) & _POLLOUT)


def explain(handshake, message):
    """`message` explained by a Handshake watcher, if there is one."""
    return message if handshake is None else handshake.explain(message)


def close(handshake):
    if handshake is not None:
        handshake.close()
