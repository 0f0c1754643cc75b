"""`modelhost logs NAME [-n LINES] [-f]`: what `modelhost up` keeps in <runtime_dir>/logs.

The supervisor appends the lines of each of its children (the broker and every
daemon) to NAME.log and moves a full file to NAME.log.1. Reading takes the
last lines across both; following keeps up with that move the way `tail -F`
does. Under systemd there are no such files: the journal has the lines.

Runs on Python >= 3.7 with the standard library only.
"""

import os
import sys
import time

from . import local

EXIT_ERROR = 1
EXIT_USAGE = 2
BLOCK = 65536
# How often a follower looks for new lines once it has read everything.
FOLLOW_POLL_S = 0.2
BROKER_UNIT = "modelhost-broker"
DAEMON_UNIT = "modelhost-daemon@{}"


def runtime_dir(config_path=None):
    """As the other commands find the broker: from --config, else the default runtime dir."""
    if config_path:
        from modelhost.broker.config import load_config

        return str(load_config(config_path).broker.runtime_dir)
    return local.default_runtime_dir()


def names_with_logs(directory):
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    names = set()
    for entry in entries:
        for suffix in (".log", ".log.1"):
            if entry.endswith(suffix) and len(entry) > len(suffix):
                names.add(entry[:-len(suffix)])
    return sorted(names)


def open_logs(path):
    """[(file, size)] of path.1 and path, oldest first, those that exist; sizes as of now.

    The current file is opened first: a rotation in between then shows as the
    same file twice, which is skipped, rather than as a gap.
    """
    opened = []
    for candidate in (path, path + ".1"):
        try:
            handle = open(candidate, "rb", buffering=0)
        except FileNotFoundError:
            continue
        stat = os.fstat(handle.fileno())
        if any(_same_file(stat, os.fstat(other.fileno())) for other, _ in opened):
            handle.close()
            continue
        opened.append((handle, stat.st_size))
    opened.reverse()
    return opened


def _same_file(a, b):
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def last_lines(files, count):
    """The last `count` lines of [(file, size)] read as one text, oldest file first (bytes)."""
    if count <= 0:
        return b""
    pieces, newlines = [], 0
    for handle, size in reversed(files):
        end = size
        # One newline more than lines wanted marks where the first of them starts.
        while end > 0 and newlines <= count:
            start = max(0, end - BLOCK)
            handle.seek(start)
            block = handle.read(end - start)
            pieces.append(block)
            newlines += block.count(b"\n")
            end = start
        if newlines > count:
            break
    lines = b"".join(reversed(pieces)).split(b"\n")
    ends_with_newline = lines[-1] == b""
    if ends_with_newline:
        lines.pop()
    return b"\n".join(lines[-count:]) + (b"\n" if ends_with_newline and lines else b"")


def follow(path, handle, out, poll_s=None):
    """Write what is appended to path from handle's position on, across rotations, forever."""
    while True:
        data = handle.read(BLOCK) if handle is not None else b""
        if data:
            out.write(data)
            out.flush()
            continue
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and (handle is None
                                    or not _same_file(current, os.fstat(handle.fileno()))):
            # Moved to path.1 and a new file begun: the old one is complete
            # (the supervisor closes it first); finish it, then take the new one.
            if handle is not None:
                rest = handle.read()
                while rest:
                    out.write(rest)
                    rest = handle.read()
                out.flush()
                handle.close()
            try:
                handle = open(path, "rb", buffering=0)
            except FileNotFoundError:
                handle = None
            continue
        if current is not None and current.st_size < handle.tell():
            handle.seek(0)  # truncated in place: start over, as tail -F does
            continue
        time.sleep(FOLLOW_POLL_S if poll_s is None else poll_s)


def systemd_scope():
    """"--user " or "" where modelhost's systemd units are installed; None where they are not."""
    user_base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    places = [("--user ", os.path.join(user_base, "systemd", "user"))] + [
        ("", directory) for directory in ("/etc/systemd/system", "/usr/lib/systemd/system",
                                          "/lib/systemd/system")]
    for scope, directory in places:
        if os.path.exists(os.path.join(directory, BROKER_UNIT + ".service")):
            return scope
    return None


def explain_missing(name, directory, err):
    names = names_with_logs(directory)
    scope = systemd_scope()
    if scope is not None:
        unit = BROKER_UNIT if name == "broker" else DAEMON_UNIT.format(name)
        print("modelhost: no log file for {} in {}; modelhost's systemd units are installed, "
              "and under systemd the output goes to the journal: journalctl {}-u {} -f".format(
                  name, directory, scope, unit), file=err)
    if names:
        print("modelhost: no logs for {!r}; these have logs in {}: {}".format(
            name, directory, ", ".join(names)), file=err)
    elif scope is None:
        print("modelhost: no logs in {}: `modelhost logs` shows what `modelhost up` writes "
              "there; is it running, and with this configuration (--config)?".format(directory),
              file=err)
    return EXIT_USAGE


def main(name, lines=100, follow_it=False, config=None, out=None, err=None):
    out = out or sys.stdout.buffer
    err = err or sys.stderr
    try:
        directory = os.path.join(runtime_dir(config), "logs")
    except Exception as exc:  # the broker package's ConfigError, imported lazily
        print("modelhost: the configuration is not valid:\n{}".format(exc), file=err)
        return EXIT_USAGE
    if lines < 0:
        print("modelhost: -n takes a count of lines, 0 or more", file=err)
        return EXIT_USAGE
    if not name or name.startswith(".") or os.path.basename(name) != name:
        return explain_missing(name, directory, err)
    path = os.path.join(directory, name + ".log")
    files = open_logs(path)
    if not files:
        return explain_missing(name, directory, err)
    try:
        out.write(last_lines(files, lines))
        out.flush()
        if follow_it:
            handle, size = files[-1] if files[-1][0].name == path else (None, 0)
            if handle is not None:
                handle.seek(size)
            follow(path, handle, out)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # A reader that went away (`| head`) is an ordinary end; silence the
        # flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    finally:
        for handle, _ in files:
            handle.close()
    return 0
