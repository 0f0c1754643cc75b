"""Segment files that a process fills again instead of making new ones (see _shm.py).

On a tmpfs, filling pages that are already allocated costs a fraction of
allocating new ones (and freeing them after), which is most of a large
payload's cost. A pooled file `modelhost-<uid>-<owner>-p<n>` is lent under a
second name, the message's segment name (a hard link); the receiver takes a
shared flock on it, checks that the name still is that file, maps it and
unlinks the name, and keeps the lock while its mapping lives. The file is
free again once it has one name left and an exclusive flock succeeds: every
receiver has let go of it, or the message was dropped (its name unlinked by
whoever dropped it). The owner holds that exclusive lock while it writes, so
a receiver never maps a file being refilled.

A receiver may hold at most HELD_MAX pooled segments mapped at once (each
keeps a descriptor for its lock); beyond, it copies what arrives out of the
segment under the lock and lets go at once.

Runs on Python 3.7 with only the standard library.
"""

import atexit
import fcntl
import os
import threading
import time

# Segment files a process keeps to fill again, per directory, and how long one
# may lie unused before it is unlinked.
POOL_FILES = 4
POOL_IDLE_S = 30.0
# Pooled segments a receiver keeps mapped at once; beyond, it copies.
HELD_MAX = 256

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _unlink(directory, name):
    try:
        os.unlink(os.path.join(directory, name))
    except OSError:
        pass


class _PoolFile(object):
    __slots__ = ("fd", "name", "capacity", "used_at", "busy")

    def __init__(self, fd, name):
        self.fd = fd
        self.name = name
        self.capacity = 0
        self.used_at = time.monotonic()
        self.busy = False  # being written by a thread of this process


class _Pool(object):
    """Segment files this process fills again; see the module's docstring."""

    def __init__(self, directory):
        self.directory = directory
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.files = []

    def take(self, size, new_name):
        """A free pool file (locked exclusively, marked busy) to hold `size` bytes, or None;
        `new_name()` names a file the pool adds."""
        with self.lock:
            if os.getpid() != self.pid:
                self.files, self.pid = [], os.getpid()  # a fork: those are the parent's
            self._trim(time.monotonic())
            # The smallest that fits, else the largest (it grows).
            for entry in sorted((f for f in self.files if not f.busy), key=lambda f: (
                    f.capacity < size, f.capacity if f.capacity >= size else -f.capacity)):
                try:
                    info = os.fstat(entry.fd)
                    if info.st_nlink == 0 or not self._named(entry, info):
                        self._drop(entry)  # its own name unlinked by someone: forget it
                        continue
                    if info.st_nlink > 1:
                        continue  # lent, not yet taken
                    fcntl.flock(entry.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # BlockingIOError: a receiver still maps it
                    continue
                entry.busy = True
                return entry
            if len(self.files) >= POOL_FILES:
                return None
            name = new_name()
            fd = os.open(os.path.join(self.directory, name),
                         os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            entry = _PoolFile(fd, name)
            entry.busy = True
            self.files.append(entry)
            return entry

    def lend(self, entry, name, size):
        """Link the filled `entry` under the message's segment `name`; free it for reuse
        by this process once its receivers let go (name None: the write failed)."""
        try:
            entry.capacity = max(entry.capacity, size)
            if name is not None:
                os.link(os.path.join(self.directory, entry.name),
                        os.path.join(self.directory, name))
        finally:
            with self.lock:
                fcntl.flock(entry.fd, fcntl.LOCK_UN)
                entry.busy = False
                entry.used_at = time.monotonic()

    def trim(self, idle_s=POOL_IDLE_S):
        with self.lock:
            self._trim(time.monotonic(), idle_s)

    def _trim(self, now, idle_s=POOL_IDLE_S):
        # Unlinking is safe even while a receiver maps it: its mapping stays.
        for entry in [f for f in self.files if not f.busy and now - f.used_at >= idle_s]:
            self._drop(entry)

    def _named(self, entry, info):
        try:
            named = os.stat(os.path.join(self.directory, entry.name))
        except OSError:
            return False
        return (named.st_ino, named.st_dev) == (info.st_ino, info.st_dev)

    def _drop(self, entry):
        self.files.remove(entry)
        _unlink(self.directory, entry.name)
        os.close(entry.fd)


_pools = {}
_pools_lock = threading.Lock()


def pool(directory):
    """This process's pool of segment files in `directory`."""
    with _pools_lock:
        found = _pools.get(directory)
        if found is None:
            found = _pools[directory] = _Pool(directory)
        return found


def trim(directory):
    """Unlink this process's pooled files in `directory` unused for POOL_IDLE_S."""
    found = _pools.get(directory)
    if found is not None:
        found.trim()


@atexit.register
def _close_pools():
    for found in list(_pools.values()):
        if found.pid == os.getpid():
            found.trim(idle_s=0.0)


_held = [0]  # pooled segments this process maps (each with its descriptor and lock)
_held_lock = threading.Lock()


def hold():
    """Whether a receiver may keep one more pooled segment mapped (counted if so)."""
    with _held_lock:
        if _held[0] >= HELD_MAX:
            return False
        _held[0] += 1
        return True


def let_go(fd):
    os.close(fd)  # and with it the shared lock: the owner may fill the file again
    with _held_lock:
        _held[0] -= 1
