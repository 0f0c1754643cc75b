"""The sd_notify protocol: telling systemd that the broker is ready, alive, stopping.

Under a `Type=notify` unit, systemd passes $NOTIFY_SOCKET, a unix datagram
socket (a leading '@' names one in the abstract namespace), and reads
newline-separated KEY=VALUE assignments from it: READY=1 once the sockets are
bound, STOPPING=1 on shutdown, STATUS=... for `systemctl status`, and, when
the unit has WatchdogSec=, WATCHDOG=1 at least every $WATCHDOG_USEC
microseconds, or the service is taken for wedged and restarted.

A few lines of socket code rather than a dependency: the protocol is one
datagram, and without $NOTIFY_SOCKET (not under systemd) everything here is
a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("modelhost.broker")


class Notifier:
    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET") or None
        if path is not None and path.startswith("@"):
            path = "\0" + path[1:]  # the abstract namespace
        self.address = path
        # The watchdog is ours only if systemd meant this process (WATCHDOG_PID
        # unset, or our pid): a child must not keep its parent's watchdog fed.
        usec = environ.get("WATCHDOG_USEC")
        watched_pid = environ.get("WATCHDOG_PID")
        self.watchdog_s = None
        if usec and usec.isdigit() and int(usec) > 0 and (
                not watched_pid or watched_pid == str(os.getpid())):
            # Twice per period, as sd_watchdog_enabled(3) advises.
            self.watchdog_s = int(usec) / 2e6
        self._socket = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **assignments) -> bool:
        """Send KEY=VALUE lines (ready=1 becomes READY=1); False when nobody listens."""
        if self.address is None:
            return False
        message = "\n".join("{}={}".format(key.upper(), value)
                            for key, value in assignments.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
            return True
        except OSError as exc:
            # systemd went away or the socket is full: the broker serves on.
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status)

    def stopping(self) -> bool:
        return self.notify(stopping=1, status="stopping")

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
