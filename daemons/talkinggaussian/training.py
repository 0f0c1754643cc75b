"""The training job's machinery: upstream's scripts as subprocesses, their progress, a working copy.

Upstream (9bd34f7) trains a subject in steps that are each a script run from
the checkout: data_utils/process.py (preprocessing, tasks 1..9),
data_utils/easyportrait/create_teeth_mask.py, then train_mouth.py,
train_face.py and train_fuse.py. They report progress as tqdm bars
(`Training progress:  12%|#2   | 6000/50000 [...]`, redrawn with carriage
returns) and, in the face tracker, lines like `3 of 12 done`. They start
grandchildren of their own (process.py runs its tasks through os.system), so
each step runs in its own process group, and a cancelled step is ended by
signalling the whole group.

Upstream also writes into the dataset directory while it builds a Scene
(points3d.ply, always) and while it prepares one (teeth_mask/, au.csv,
aud_*.npy). A dataset that is read-only (a shared, prepared one) is trained
through a WorkingCopy: a writable directory of symbolic links to the
dataset's entries, with real copies of the files upstream rewrites.

Standard library only; runs on Python 3.7.
"""

import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque

from modelhost.errors import Cancelled

# Files upstream writes into a dataset while it trains on it: copied, never linked.
REWRITTEN_FILES = ("points3d.ply",)

# tqdm: " 12%|#2        | 6000/50000 [02:00<14:40, 50.0it/s, Loss=0.01]"
_TQDM = re.compile(r"(\d+)/(\d+)\s*\[")
# face_tracker.py: "3 of 12 done"
_OF_DONE = re.compile(r"^\s*(\d+) of (\d+) done")
TAIL_LINES = 40


class StageFailed(RuntimeError):
    """A step of the training job failed; the message names it and quotes its output."""


def parse_progress(line):
    """(done, total) from one line of a script's output, or None."""
    match = _TQDM.search(line) or _OF_DONE.search(line)
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    if total <= 0:
        return None
    return min(done, total), total


def split_lines(buffer, data):
    """Feed bytes; complete lines (split at \\n and at tqdm's \\r) out, the rest kept."""
    buffer.extend(data)
    lines = []
    start = 0
    for i, byte in enumerate(buffer):
        if byte in (10, 13):  # \n, \r
            if i > start:
                lines.append(bytes(buffer[start:i]).decode("utf-8", "replace"))
            start = i + 1
    del buffer[:start]
    return lines


def end_process_group(process, grace_s=5.0):
    """SIGTERM to the process's whole group, SIGKILL after grace_s; waits for the leader."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except OSError:  # the group is gone already
            pass
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure no grandchild of its group survives it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        return
    raise RuntimeError("process {} did not end after SIGKILL".format(process.pid))


def run_step(command, cwd, env, on_progress, is_cancelled, log_path=None, poll_s=0.1,
             label=None):
    """Run one script to its end; on_progress(done, total, line) for each progress line.

    Raises Cancelled (after ending its process group) when is_cancelled()
    turns true, StageFailed when it exits with a non-zero status.
    """
    label = label or " ".join(os.path.basename(part) for part in command[:2])
    tail = deque(maxlen=TAIL_LINES)
    log = open(log_path, "ab") if log_path else None
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    except OSError as exc:
        if log:
            log.close()
        raise StageFailed("{}: cannot start `{}`: {}".format(label, " ".join(command), exc))
    lines = deque()
    lock = threading.Lock()

    def read():
        buffer = bytearray()
        while True:
            data = process.stdout.read1(1 << 14) if hasattr(process.stdout, "read1") \
                else process.stdout.read(1 << 14)
            if not data:
                break
            if log:
                log.write(data)
                log.flush()
            found = split_lines(buffer, data)
            with lock:
                lines.extend(found)
        if buffer:
            with lock:
                lines.append(bytes(buffer).decode("utf-8", "replace"))

    reader = threading.Thread(target=read, name="train-step-reader")
    reader.daemon = True
    reader.start()

    def drain():
        with lock:
            found = list(lines)
            lines.clear()
        latest = None
        for line in found:
            tail.append(line)
            progress = parse_progress(line)
            if progress is not None:
                latest = (progress, line)
        if latest is not None:  # a burst of redraws: only where it got to counts
            on_progress(latest[0][0], latest[0][1], latest[1].strip())

    try:
        while process.poll() is None:
            if is_cancelled():
                end_process_group(process)
                raise Cancelled("the training was cancelled during {}".format(label))
            drain()
            try:
                process.wait(poll_s)  # returns as soon as the step ends
            except subprocess.TimeoutExpired:
                pass
        reader.join(30)
        drain()
    except BaseException:
        if process.poll() is None:  # an error in on_progress, or KeyboardInterrupt
            end_process_group(process)
        raise
    finally:
        # A step's own children (os.system) must not outlive it either.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        if process.stdout:
            process.stdout.close()
        if log:
            log.close()
    if process.returncode != 0:
        raise StageFailed("{} failed with status {}; its last output:\n{}".format(
            label, process.returncode, "\n".join(tail)))
    return list(tail)


class WorkingCopy(object):
    """A writable stand-in for a dataset directory that upstream would write into.

    prepare() fills `path` with a symbolic link per entry of `source`, except
    the files in REWRITTEN_FILES, which are copied; upstream then writes its
    files (points3d.ply, teeth_mask/, au.csv, ...) next to the links and
    never touches `source`. Entries already in `path` that are real files or
    directories (written by an earlier run) are kept.
    """

    def __init__(self, source, path):
        self.source = os.path.abspath(source)
        self.path = os.path.abspath(path)

    def prepare(self):
        if self.path == self.source:
            raise ValueError("a working copy of {} cannot be the directory itself".format(
                self.source))
        if not os.path.isdir(self.source):
            raise FileNotFoundError("dataset not found at {}".format(self.source))
        if not os.path.isdir(self.path):
            os.makedirs(self.path)
        for name in sorted(os.listdir(self.source)):
            source = os.path.join(self.source, name)
            target = os.path.join(self.path, name)
            if os.path.islink(target):
                if os.readlink(target) == source:
                    continue
                os.unlink(target)
            elif os.path.exists(target):
                continue  # written here before: upstream's own output wins
            if name in REWRITTEN_FILES and os.path.isfile(source):
                shutil.copyfile(source, target)
            else:
                os.symlink(source, target)
        return self.path

    @staticmethod
    def writable(directory):
        """Whether files can be created in `directory` (it exists and is writable)."""
        return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)
