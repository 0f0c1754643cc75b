"""CURVE on the broker's tcp sockets: its key pair, and a ZAP thread that lets in
only the public keys in the authorized-keys directory.

With `broker.curve` configured, every tcp:// socket the broker binds is a
CURVE server (loopback too: any local user can reach a loopback port); ipc://
stays plain, guarded by the runtime dir's permissions. Without it nothing
changes, and the configuration allows tcp:// on loopback only.

The directory is read again whenever its *.key files change, at the next
handshake: adding or removing a client's key needs no restart (connections
already made stay). The broker's own public key is always let in, so that
the processes of this host that can read its secret key (the supervisor, the
daemons) connect as the broker itself.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .config import BrokerConfig, CurveConfig

log = logging.getLogger("modelhost.broker")

# One line per refused key per this many seconds: a refused client that keeps
# reconnecting must not flood the log.
REFUSAL_LOG_INTERVAL_S = 60.0


class AuthorizedKeys:
    """The public keys let in (z85), from a directory of NAME.key files.

    Its callback runs on the ZAP thread, and only there once the broker runs.
    """

    def __init__(self, directory: Path, own_key: bytes, clock=time.monotonic):
        self.directory = directory
        self.own_key = own_key
        self.clock = clock
        self.keys: dict[bytes, str] = {}  # z85 public key -> the file it came from
        self._signature: tuple | None = None
        self._refusals: dict[bytes, list] = {}  # key -> [last logged at, refused since]
        self.peer = "?"  # the address of the handshake being decided
        self.refresh()

    def refresh(self) -> None:
        try:
            entries = sorted((entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                             for entry in os.scandir(self.directory)
                             if entry.name.endswith(".key") and entry.is_file())
        except OSError as exc:
            if self._signature != "unreadable":
                log.error("cannot read the authorized keys in %s: %s; keeping the %d keys "
                          "read before", self.directory, exc.strerror or exc, len(self.keys))
                self._signature = "unreadable"
            return
        if entries == self._signature:
            return
        keys = {}
        for name, _, _ in entries:
            path = self.directory / name
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                log.warning("authorized keys: skipped %s: %s", path, exc)
                continue
            keys[public] = name
        if self._signature is not None:
            log.info("authorized keys: %d in %s (re-read: the directory changed)", len(keys),
                     self.directory)
        else:
            log.info("authorized keys: %d in %s", len(keys), self.directory)
        self.keys, self._signature = keys, entries

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth's credentials provider: may this z85 public key connect?"""
        if key == self.own_key:
            return True
        self.refresh()
        if key in self.keys:
            return True
        self._log_refusal(key)
        return False

    def _log_refusal(self, key: bytes) -> None:
        now = self.clock()
        entry = self._refusals.get(key)
        if entry is not None and now - entry[0] < REFUSAL_LOG_INTERVAL_S:
            entry[1] += 1
            return
        more = f" ({entry[1]} more refusals of it since)" if entry and entry[1] else ""
        log.warning("refused a client at %s: its CURVE public key %s is not among the "
                    "authorized keys in %s%s; to let it in, copy its NAME.key there",
                    self.peer, key.decode("ascii", "replace"), self.directory, more)
        self._refusals[key] = [now, 0]


class _Authenticator(ThreadAuthenticator):
    """zmq.auth's ZAP thread, telling the key check which peer it decides on."""

    keyring: AuthorizedKeys | None = None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if self.keyring is not None and len(msg) > 3:
            self.keyring.peer = msg[3].decode("utf-8", "replace") or "?"
        await super().handle_zap_message(msg)


class Curve:
    """The broker's CURVE servers; does nothing when `broker.curve` is not configured."""

    def __init__(self, context: zmq.Context, config: CurveConfig | None):
        self.authenticator = None
        if config is None:
            return
        self.public, self.secret = zmq.auth.load_certificate(str(config.secret_key))
        if self.secret is None:
            raise ValueError(f"{config.secret_key} holds no secret key")
        self.keyring = AuthorizedKeys(config.authorized_keys, self.public)
        # zmq.auth's own lines are per handshake, at debug: keep them out of the
        # broker's debug log; refusals are logged by the keyring.
        zap_log = logging.getLogger("modelhost.broker.zap")
        zap_log.setLevel(logging.WARNING)
        # Before any bind: a CURVE socket with no ZAP handler lets every key in.
        self.authenticator = _Authenticator(context, log=zap_log)
        self.authenticator.keyring = self.keyring
        self.authenticator.start()
        self.authenticator.configure_curve_callback("*", self.keyring)
        log.info("CURVE on the tcp endpoints: the broker's public key is %s (from %s)",
                 self.public.decode("ascii"), config.secret_key)

    def serve(self, socket: zmq.Socket, endpoint: str) -> None:
        """Make `socket` a CURVE server if it binds tcp:// and CURVE is configured."""
        if self.authenticator is None or not endpoint.startswith("tcp://"):
            return
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)

    def close(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


def secure_link(socket: zmq.Socket, broker: BrokerConfig) -> None:
    """Make a socket to the broker's frontend a CURVE client using the broker's own key
    pair (always let in), when the frontend is tcp:// and CURVE is configured."""
    if broker.curve is None or not broker.frontend.startswith("tcp://"):
        return
    public, secret = zmq.auth.load_certificate(str(broker.curve.secret_key))
    socket.setsockopt(zmq.CURVE_SERVERKEY, public)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
