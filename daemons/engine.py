"""The engine interface: what a model author writes to be served by modelhost.

An engine is a class built with its configured options as keyword arguments
(cheap: nothing heavy in __init__), then moved between memory tiers by the
runtime when the broker says so (the broker knows what else needs the device):

- load()     unloaded -> resident: weights to the device;
- unload()   resident or offloaded -> unloaded: weights gone, memory freed;
             the process stays, and a later load() must work again;
- offload()  resident -> offloaded: weights to host RAM, device memory freed;
- onload()   offloaded -> resident: weights back to the device they came from.

A daemon starts unloaded; nothing is loaded until the broker asks (for a
call, or on `modelhost load NAME`). offload()/onload() are optional: the
runtime offers the offloaded tier only when the class defines both (Engine
has neither; modelhost.daemons.torch_tiers.TorchEngine has both for torch
modules). After offload() and unload() the runtime collects garbage, empties
torch's CUDA cache and trims the C heap, so an engine only drops its
references. Operations run only at tier resident; a transition waits for the
running calls and refuses new ones. A hook that raises leaves the daemon
where it was (after a load that raised: state `failed`, until the next load
request tries again); the broker decides what comes next.

Operations: methods marked with @operation, called as
`method(ctx, **arguments)`. An operation returns its result, or is a
generator: each yielded value is streamed to the client as a partial
chunk, and the generator's return value is the result.

The runtime owns sockets, heartbeats, memory reports, cancellation and error
replies; engine code holds no socket code.

Threads: the tier hooks (load, unload, offload, onload) run one at a time on
a lifecycle thread, each operation on the thread of the slot that received
it (one per `concurrency`). Settings that a library keeps per thread
(torch.set_num_threads on some builds, torch.cuda.set_device, CUDA streams)
belong in the operation itself or in the daemon's environment (`env:` in the
config, e.g. OMP_NUM_THREADS), not only in load(). Raise `BadArguments` for
bad input (the client gets `bad_arguments`); any other exception becomes an
`engine_error` reply and the daemon keeps serving.
"""

from modelhost.errors import BadArguments, Cancelled  # noqa: F401 (re-exported for engines)

_OPERATION_MARK = "__modelhost_operation__"


def operation(func):
    """Mark an engine method as callable by clients."""
    setattr(func, _OPERATION_MARK, True)
    return func


def operations_of(engine):
    """{name: bound method} of the engine's operations."""
    found = {}
    for name in dir(type(engine)):
        if name.startswith("_"):
            continue
        member = getattr(type(engine), name, None)
        if callable(member) and getattr(member, _OPERATION_MARK, False):
            found[name] = getattr(engine, name)
    return found


class Engine(object):
    """Base class with the lifecycle hooks as no-ops; subclasses override what they need."""

    def __init__(self, **options):
        self.options = options

    def load(self):
        """Bring the weights to the device. Called on the lifecycle thread."""

    def unload(self):
        """Drop the weights (from the device or from host RAM after offload())."""

    # offload()/onload() are deliberately absent here: the runtime offers the
    # host-RAM tier only for engines that define both.

    @classmethod
    def preflight(cls, options):
        """What keeps this engine from loading on this machine: a list of lines for people.

        Cheap checks only, and no imports of heavy libraries: a weight
        directory that is missing (say its exact path and what belongs
        there), a checkout that is not there, a compiled extension that is
        not built. `modelhost setup` prints them after building the venv; at
        daemon start they make the daemon `failed` with these lines, before
        the engine is built. Empty: nothing known to be missing.
        """
        return []

    def describe(self):
        """Extra facts for `modelhost ps` (library versions, device, ...)."""
        return {}


class CallContext(object):
    """What an operation gets besides its arguments: progress, streaming, cancellation."""

    def __init__(self, request_id, method, stream, send):
        self.request_id = request_id
        self.method = method
        # True when the client iterates partial chunks; an engine may use it to
        # pick a streaming code path.
        self.stream = stream
        self._send = send
        # A plain flag: set by the runtime's control thread, read by the
        # engine; nobody waits on it, and an Event costs more per call.
        self._cancelled = False
        # Index of the runtime slot running the call.
        self.slot = None

    @property
    def cancelled(self):
        return self._cancelled

    def check_cancelled(self):
        """Raise Cancelled if the client (or a deadline) cancelled this call."""
        if self._cancelled:
            raise Cancelled("the call was cancelled")

    def progress(self, fraction=None, stage=None, message=None):
        """Report progress: fraction in [0, 1], an optional stage name and a line for people."""
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        self._send("progress", {"fraction": fraction, "stage": stage, "message": message})

    def partial(self, value):
        """Stream one chunk to the client (the same as yielding it from a generator)."""
        self._send("partial", value)

    def cancel(self):
        self._cancelled = True
