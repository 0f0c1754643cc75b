"""Test doubles shared by the unit tests: a clock the test advances by hand, and
effects that record what the scheduler asked for.

The scheduler (and any engine with an injected clock) is driven synchronously
with these: no threads, no sleeps, no sockets.
"""


class FakeClock(object):
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class RecordingEffects(object):
    """Every effect as a tuple naming the daemon and the request id; messages kept aside.

    `connected = False` makes dispatch answer as the broker does for a slot
    whose socket has not connected yet.
    """

    def __init__(self):
        self.effects = []
        self.events = []
        self.messages = {}  # request id -> message of its last reply_error / reply_cancelled
        self.connected = True

    def dispatch(self, daemon, request):
        if not self.connected:
            self.effects.append(("dispatch_failed", daemon.name, request.id))
            return False
        self.effects.append(("dispatch", daemon.name, request.id))
        return True

    def cancel_remote(self, daemon, request):
        self.effects.append(("cancel_remote", daemon.name, request.id))

    def reply_error(self, request, error):
        self.effects.append(("reply_error", request.id, error.code))
        self.messages[request.id] = error.message

    def reply_cancelled(self, request, message):
        self.effects.append(("reply_cancelled", request.id))
        self.messages[request.id] = message

    def reply_result(self, request, value):
        self.effects.append(("reply_result", request.id))

    def set_tier(self, daemon, tier):
        self.effects.append(("set_tier", daemon.name, tier))

    def set_process(self, daemon, running):
        self.effects.append(("set_process", daemon.name, running))

    def event(self, kind, daemon, **fields):
        # Kept apart from the effects: what a test of one decision asserts on.
        self.events.append(dict(fields, kind=kind, daemon=daemon))

    def take(self):
        """The effects recorded since the last take."""
        taken, self.effects = self.effects, []
        return taken


def make_config(daemons, memory=None, **broker):
    """A Config as the scheduler takes it: `daemons` maps each name to the
    DaemonConfig fields it sets (engine and python need not be given),
    `broker` sets BrokerConfig fields, `memory` is a MemoryConfig.

    Every other field keeps the default the configuration file would give it.
    """
    from pathlib import Path

    from modelhost.broker.config import BrokerConfig, Config, DaemonConfig, MemoryConfig

    base = Path("/nonexistent/modelhost-test")
    return Config(
        path=None,
        broker=BrokerConfig(runtime_dir=base / "run", state_dir=base / "state",
                            frontend="inproc://frontend", backend="inproc://backend",
                            events="inproc://events", memory=memory or MemoryConfig(), **broker),
        daemons={name: DaemonConfig(**dict({"name": name, "engine": "fake:Fake",
                                            "python": "3"}, **fields))
                 for name, fields in daemons.items()})
