"""What every modelhost process on this machine agrees on, apart from the wire.

Where the ipc sockets live (the runtime dir), which endpoint a client uses
when none is given, how an interpreter names itself in `ps`, and how every
process logs (one event a line on stderr, or in the journal's own format).
The broker, the supervisor, the clients and every daemon share these, so
they are here once; the wire itself is `modelhost.protocol`.

This module runs on Python 3.7 with the standard library only.
"""

import os
import sys


def default_runtime_dir():
    """Where ipc sockets live when nothing else is configured."""
    explicit = os.environ.get("MODELHOST_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "modelhost")
    return os.path.join("/tmp", "modelhost-{}".format(os.getuid()))


def default_endpoint():
    """The broker's client endpoint: $MODELHOST_ENDPOINT, else the runtime dir's socket."""
    return os.environ.get("MODELHOST_ENDPOINT") or "ipc://" + os.path.join(
        default_runtime_dir(), "frontend.sock")


def interpreter_description():
    return "CPython {}.{}.{} ({})".format(sys.version_info[0], sys.version_info[1],
                                          sys.version_info[2], sys.executable)


def stderr_is_journal(stream=None):
    """Whether stderr is the journal: systemd sets JOURNAL_STREAM=<dev>:<inode> of the
    stream it connected, which a child's redirected stderr no longer matches."""
    dev, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat((stream or sys.stderr).fileno())
        return bool(sep) and (stat.st_dev, stat.st_ino) == (int(dev), int(inode))
    except (AttributeError, ValueError, OSError):
        # No stderr, one without a descriptor (io.UnsupportedOperation is an
        # OSError and a ValueError), or a malformed variable.
        return False


def configure_logging(component, level="info"):
    """One event a line on stderr: time, level, component, then `daemon=` / `rid=` fields.

    Shared by the broker, the supervisor and every daemon so that their lines,
    interleaved in one terminal or journal, read and parse alike. Under the
    journal each line starts with its syslog priority (`<3>`, sd-daemon.h)
    instead of a time, which the journal records itself; every line of a
    traceback carries it, or the journal would file the rest as info.
    """
    import logging

    class JournalFormatter(logging.Formatter):
        def format(self, record):
            level = record.levelno
            prefix = "<{}>".format(2 if level >= logging.CRITICAL else 3 if level >= logging.ERROR
                                   else 4 if level >= logging.WARNING
                                   else 6 if level >= logging.INFO else 7)
            text = logging.Formatter.format(self, record)
            return "\n".join(prefix + line for line in text.split("\n"))

    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(levelname)s " + component + " %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s " + component + " %(message)s",
            "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
