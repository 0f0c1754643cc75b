"""Large payloads in shared memory: segments, their names, who unlinks them, and the sweep.

Above a size threshold a binary leaf of a message (bytes, or a numpy array's
data) is written into a *segment*, a file in a segment directory on a tmpfs
(/dev/shm, else the runtime dir), and the header carries a reference
(`protocol._EXT_SHM`: segment name, offset, size, dtype, shape) in place of
a payload frame. The receiver maps the file read-only: an array is a view on
the mapping, with no copy. The broker forwards references like any header
value and never maps a segment. Plain files and `mmap`, no
multiprocessing.shared_memory: this runs on Python 3.7 daemons too.

Who unlinks what (the name says whose it is, so that a sweeper can tell):

    modelhost-<uid>-<pid>.<start>-<seq>                       made by its owner
    modelhost-<uid>-<pid>.<start>-r<tag>-<maker pid>.<seq>    made for its owner

<pid>.<start> is the owner process (its pid and start time in clock ticks
since boot, so a recycled pid is not mistaken for the owner); <tag> names the
owner's request the segment answers. Every segment belongs to a client:
- a call's arguments: the client makes them; the daemon unlinks them as soon
  as it has mapped them (the mapping stays readable), the client on the
  request's terminal reply and on its own errors (ENOENT is fine);
- a reply's values: the daemon makes them *for* the client that called
  (the call offers its owner name and tag), the client unlinks them once
  mapped, the broker when it drops the reply, the client when the request
  ends without a result (say the daemon died between writing and sending)
  by the request's tag;
- whatever a dead process owned: every broker sweeps its segment dir at
  start, every SWEEP_S and when a daemon dies, and every client and daemon
  once at start.

Most of what a large payload costs on a tmpfs is allocating its pages and
freeing them after, so the bytes of a segment usually live in one of a few
files that their owner fills again, `modelhost-<uid>-<pid>.<start>-p<n>`,
lent under the message's segment name (a second name of the same file) and
refilled only once every receiver has let go: see _shm_pool.py.

A leaf goes into shared memory only when both ends see the same directory
(a *token*: boot id, uid, device and inode of the directory; another host,
container or user differs), the segment would not take the segments that
exist over `max_total`, and the file system has room. Otherwise it travels as
a frame, as below the threshold, and the first time per reason the process
logs why. Nothing falls back silently mid-message: a write that fails leaves
no reference behind, and a reference that cannot be mapped is a BadMessage.

Runs on Python 3.7 with only the standard library.
"""

import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import re
import stat
import threading
import weakref

from . import _shm_pool
from .errors import BadMessage

log = logging.getLogger("modelhost.shm")

DEFAULT_THRESHOLD = 2**20
DEFAULT_MAX_TOTAL = 2**30
# How often a broker sweeps its segment dir for what dead processes owned.
SWEEP_S = 5.0
_ALIGN = 64  # offset of each leaf in a segment: numpy's widest alignment needs

_PREFIX = "modelhost-{}-".format(os.getuid())
_NAME = re.compile(r"^modelhost-(\d{1,10})-(\d{1,10})\.(\d{1,20})-"
                   r"(?:r([0-9a-z]{1,16})-\d{1,10}\.|p)?\d{1,20}$")
_OWNER = re.compile(r"^\d{1,10}\.\d{1,20}$")
_TAG = re.compile(r"^[0-9a-z]{1,16}$")
_MAX_NAME = 128

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

_said = set()
_said_lock = threading.Lock()


def say_once(key, level, message, *args):
    """Log a choice between shared memory and frames once per process and reason."""
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    log.log(level, message, *args)


def is_name(value):
    return isinstance(value, str) and len(value) <= _MAX_NAME and _NAME.match(value) is not None


def is_owner(value):
    return isinstance(value, str) and _OWNER.match(value) is not None


def is_tag(value):
    return isinstance(value, str) and _TAG.match(value) is not None


# --- processes --------------------------------------------------------------------

_HAVE_PROC = os.path.isdir("/proc/self")


def _start_time(pid):
    """The process's start time (clock ticks since boot), 0 without /proc, None when it is
    gone or a zombie."""
    if not _HAVE_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    try:
        with open("/proc/{}/stat".format(pid), "rb") as handle:
            fields = handle.read().rpartition(b")")[2].split()
    except OSError:
        return None
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


_own = {}  # pid -> this process's owner name (a fork gets its own)


def own_name():
    """This process as a segment owner: "<pid>.<start time>"."""
    pid = os.getpid()
    name = _own.get(pid)
    if name is None:
        name = _own[pid] = "{}.{}".format(pid, _start_time(pid) or 0)
    return name


def owner_alive(owner):
    pid, _, start = owner.partition(".")
    now = _start_time(int(pid))
    return now is not None and (now == 0 or now == int(start))


def owner_of(name):
    """The owner "<pid>.<start>" a segment name names, or None for a name that is not ours."""
    match = _NAME.match(name)
    if match is None or name[:len(_PREFIX)] != _PREFIX:
        return None
    return "{}.{}".format(match.group(2), match.group(3))


_counter = itertools.count(1)
_counter_lock = threading.Lock()


def _next():
    with _counter_lock:
        return next(_counter)


def new_tag():
    """A tag for one request, unique within this process (several clients may share it)."""
    return "{:x}".format(_next())


# --- directories -------------------------------------------------------------------

def default_dir(runtime_dir):
    """Where segments live unless configured: $MODELHOST_SHM_DIR, /dev/shm, else
    <runtime_dir>/shm. The broker's default and a client's, so that both agree."""
    explicit = os.environ.get("MODELHOST_SHM_DIR")
    if explicit:
        return explicit
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return os.path.join(runtime_dir, "shm")


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return os.uname()[1]


def token_of(directory):
    """What two processes compare to know they see the same segment directory as the
    same user on the same boot of the same machine; None when it is not usable here."""
    try:
        if directory != "/dev/shm":
            os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or not os.access(directory, os.W_OK | os.X_OK):
        return None
    facts = "{}:{}:{}:{}".format(_boot_id(), os.getuid(), info.st_dev, info.st_ino)
    return hashlib.sha1(facts.encode()).hexdigest()[:20]


def sweep(directory):
    """Unlink the segments in `directory` whose owner process is gone; their names."""
    removed = []
    verdicts = {}
    try:
        with os.scandir(directory) as found:
            entries = [entry.name for entry in found]
    except OSError:
        return removed
    for name in entries:
        owner = owner_of(name) if name.startswith(_PREFIX) else None
        if owner is None:
            continue
        alive = verdicts.get(owner)
        if alive is None:
            alive = verdicts[owner] = owner_alive(owner)
        if not alive and _unlink(directory, name):
            removed.append(name)
    if removed:
        log.info("removed %d shared-memory segments of processes that are gone from %s",
                 len(removed), directory)
    return removed


def unlink_listed(directory, names):
    """Unlink the segments a message that nobody will read names."""
    for name in names or ():
        if is_name(name):
            _unlink(directory, name)


def made_for(directory, tag):
    """The segments in `directory` made for this process's request `tag`."""
    prefix = "{}{}-r{}-".format(_PREFIX, own_name(), tag)
    try:
        return [name for name in os.listdir(directory) if name.startswith(prefix)]
    except OSError:
        return []


def _unlink(directory, name):
    try:
        os.unlink(os.path.join(directory, name))
        return True
    except OSError:
        return False


def used_bytes(directory):
    """The bytes of this user's segments in `directory` (a file under two names once)."""
    total = 0
    seen = set()
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(_PREFIX) and entry.inode() not in seen:
                    seen.add(entry.inode())
                    try:
                        total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
    except OSError:
        pass
    return total


# --- writing and reading -----------------------------------------------------------


class Segments(object):
    """One process's use of one segment directory: writers for the leaves it sends,
    readers for the references it receives."""

    def __init__(self, directory, threshold=DEFAULT_THRESHOLD, max_total=DEFAULT_MAX_TOTAL):
        self.directory = directory
        self.threshold = threshold  # None: never write segments
        self.max_total = max_total
        self.token = token_of(directory)

    @classmethod
    def from_spec(cls, spec):
        """The daemon's, from the "shm" map of its spec (None: shared memory off)."""
        if not spec or not spec.get("dir"):
            return None
        return cls(spec["dir"], spec.get("threshold"), spec.get("max_total", DEFAULT_MAX_TOTAL))

    def writer(self, owner=None, tag=None):
        """A Writer for one message; `owner`/`tag`: the process and request it is made for
        (None: for this process)."""
        if self.threshold is None or self.token is None:
            return None
        return Writer(self, owner, tag)

    def reader(self, unlink, allowed=None):
        return Reader(self.directory, unlink, allowed)

    def sweep(self):
        return sweep(self.directory) if self.token is not None else []

    def trim(self):
        """Unlink this process's pooled files that have lain unused for a while."""
        _shm_pool.trim(self.directory)

    def _name(self, owner, tag):
        if owner is None:
            return "{}{}-{}".format(_PREFIX, own_name(), _next())
        return "{}{}-r{}-{}.{}".format(_PREFIX, owner, tag, os.getpid(), _next())


class Writer(object):
    """Collects one message's large leaves (externalize's `place`), then writes them into
    one segment (commit). Nothing exists on disk before commit."""

    __slots__ = ("segments", "owner", "tag", "name", "parts", "size", "names")

    def __init__(self, segments, owner, tag):
        self.segments = segments
        self.owner = owner
        self.tag = tag
        self.name = None
        self.parts = []  # (offset, contiguous memoryview of bytes)
        self.size = 0
        self.names = []  # the segments committed

    def place(self, buffer):
        """[name, offset, size] for a leaf that goes into the segment, None for a frame."""
        view = memoryview(buffer)
        size = view.nbytes
        if size < self.segments.threshold or size == 0 or not view.c_contiguous:
            return None
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if self.name is None:
            self.name = self.segments._name(self.owner, self.tag)
        offset = (self.size + _ALIGN - 1) // _ALIGN * _ALIGN
        self.parts.append((offset, view))
        self.size = offset + size
        return [self.name, offset, size]

    @property
    def placed(self):
        return bool(self.parts)

    def commit(self):
        """The header's "shm" fields ({"segments", "bytes"}) once the segment is written;
        None when it could not be (the caller sends frames instead; logged once)."""
        directory = self.segments.directory
        pool = _shm_pool.pool(directory)
        entry = None
        try:
            entry = pool.take(self.size, lambda: "{}{}-p{}".format(_PREFIX, own_name(), _next()))
            if self._room(entry):
                if entry is None:
                    self._write_alone(os.path.join(directory, self.name))
                else:
                    self._fill(entry.fd)
                    pool.lend(entry, self.name, self.size)
                    entry = None
                self.names.append(self.name)
                return {"segments": [self.name], "bytes": self.size}
        except OSError as exc:
            say_once(("write", directory, exc.errno), logging.WARNING,
                     "large payloads travel as frames: cannot write a segment in %s: %s",
                     directory, exc)
        finally:
            if entry is not None:
                pool.lend(entry, None, 0)  # not used (or its write failed): free again
        return None

    def _room(self, entry):
        """Whether the segment may grow what this user's segments hold by what it needs."""
        segments, directory = self.segments, self.segments.directory
        more = self.size - (0 if entry is None else min(entry.capacity, self.size))
        if more and used_bytes(directory) + more > segments.max_total:
            say_once(("cap", directory), logging.WARNING,
                     "large payloads travel as frames while the shared-memory segments in "
                     "%s would exceed max_total (%d bytes; broker.shm.max_total)",
                     directory, segments.max_total)
            return False
        info = os.statvfs(directory)
        if more > info.f_bavail * info.f_frsize:
            say_once(("full", directory), logging.WARNING,
                     "large payloads travel as frames while %s has no room for them", directory)
            return False
        return True

    def _write_alone(self, path):
        # Every pooled file is lent: a segment of its own, freed once its reader lets go.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW,
                     0o600)
        try:
            self._fill(fd)
        except BaseException:
            os.close(fd)
            _unlink(os.path.dirname(path), os.path.basename(path))
            raise
        os.close(fd)

    def _fill(self, fd):
        for offset, view in self.parts:
            while view.nbytes:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written

    def discard(self):
        """Unlink what commit wrote (a message that is not sent after all)."""
        unlink_listed(self.segments.directory, self.names)
        del self.names[:]


class Reader(object):
    """Maps the segments one message refers to (internalize's `segment`): each file once,
    read-only, unlinked right after when this process takes ownership of it.

    `allowed`: the segment names the message's header lists (its `shm` field); a
    reference to any other is refused, so that what the broker strips from a message
    (a call from another host) cannot name this host's segments.
    """

    __slots__ = ("directory", "unlink", "allowed", "maps")

    def __init__(self, directory, unlink, allowed=None):
        self.directory = directory
        self.unlink = unlink
        self.allowed = allowed
        self.maps = {}

    def __call__(self, name, offset, size):
        """A read-only memoryview of `size` bytes at `offset` of segment `name`."""
        if not is_name(name):
            raise BadMessage("a shared-memory reference names {!r}, which is not a segment "
                             "name".format(name)[:200])
        if self.allowed is not None and name not in self.allowed:
            raise BadMessage("a shared-memory reference names segment {}, which its message "
                             "does not list (references come only from this host)".format(name))
        mapping = self.maps.get(name)
        if mapping is None:
            mapping = self.maps[name] = self._map(name)
        if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0 and size > 0
                and offset + size <= len(mapping)):
            raise BadMessage("a shared-memory reference to {} bytes at {} lies outside segment "
                             "{} ({} bytes)".format(size, offset, name, len(mapping)))
        return memoryview(mapping)[offset:offset + size]

    def _map(self, name):
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW)
        except OSError as exc:
            raise BadMessage(
                "the payload is in shared-memory segment {} which cannot be opened in {} ({}): "
                "the sender died and its segments were swept, or the two processes do not "
                "share the segment directory (broker.shm.dir, $MODELHOST_SHM_DIR)".format(
                    name, self.directory, os.strerror(exc.errno)))
        keep = False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() \
                    or info.st_mode & 0o077:
                raise BadMessage("shared-memory segment {} is not an owner-only file of this "
                                 "user; refused".format(path))
            pooled = info.st_nlink > 1  # lent from its owner's pool (_Pool)
            if pooled:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    now = os.stat(path)
                except OSError:
                    now = None  # being refilled, or the name is gone: not this message's
                if now is None or (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev):
                    raise BadMessage("shared-memory segment {} was reused before it was read; "
                                     "its message was dropped".format(name))
                info = os.fstat(fd)
            if info.st_size == 0:
                raise BadMessage("shared-memory segment {} is empty".format(path))
            mapping = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
            if pooled:
                keep = _shm_pool.hold()
                if keep:
                    # The lock lives as long as the mapping: the owner refills the file
                    # only once nothing of this message is referenced here any more.
                    weakref.finalize(mapping, _shm_pool.let_go, fd)
                else:
                    mapping = memoryview(mapping[:])  # a copy, made under the lock
        finally:
            if not keep:
                os.close(fd)
        if self.unlink:
            _unlink(self.directory, name)
        return mapping
