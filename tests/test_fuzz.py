"""Fuzzing a real broker on both of its sockets, with hypothesis.

One real `modelhost up` serves a probe daemon (concurrency 1, so a call slot that
the broker loses track of shows at once) and `ghost`, a configured daemon that is
never started, so that a fake daemon can register under a name the broker knows.

- Frontend: raw DEALER sockets with explicit identities send random bytes, msgpack
  that is not a map, maps of another version, and every op with fields of the wrong
  type (lists, maps, NaN, inf, huge and negative ints, bools, nested and unhashable
  ids, bytes, payload references), extra frames, references to payload frames that
  are not there, nesting deeper than msgpack unpacks.
- Backend: raw DEALER sockets send register, state, heartbeat and reply messages
  with hostile fields, replies addressed to another client, and registrations under
  the real daemon's name from another process.

Each frontend message with a sender gets its reply within a generous bound
(REPLY_WAIT_S; a broker answers in milliseconds): a malformed one an error of code
`bad_message` (`protocol_mismatch` for another version), naming the request's id
when the id is usable and None otherwise; a well-formed one its legitimate reply.
After each example: the broker is the same process (the supervisor restarts a dead
one, so its pid is compared), `ps` answers, the real daemon is registered as itself
(pid, interpreter, engine, methods; and the broker never had to ask it to register
again, which is how a fake that claimed the real pid shows), and a real `echo`
returns its own bytes; and the bystander client, which never sent anything, has
received nothing. A forged reply for a running call, and registrations under the
live daemon's name, are also tested one by one.

Examples against one live process cannot be shrunk (a broken broker fails every
later example), so each example records what it saw: the test goes on, puts the
host right where it can (a fresh host if it does not heal), and fails at the end
with every violation, the frames that caused it and the broker's log lines. The
shapes that broke a broker once run first in every run (KNOWN_FRONTEND,
KNOWN_BACKEND); each test's examples stop at BUDGET_S. The message counts are
printed (`fuzz total: ...`).
"""

import math
import os
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import modelhost
from modelhost import protocol
from modelhost.protocol import DaemonState, Priority, Tier

from conftest import Host, daemon_yaml, pid_alive

pytestmark = pytest.mark.slow

V = protocol.VERSION
NAN = float("nan")
INF = float("inf")
# Generous: the broker answers in milliseconds; this allows for a loaded machine.
REPLY_WAIT_S = 3.0
# Once SILENCES_TRUSTED messages of one op went unanswered (the test fails already),
# later ones of that op get QUICK_WAIT_S, so that one bug does not eat the budget.
SILENCES_TRUSTED = 3
QUICK_WAIT_S = 0.5
# How long the backend messages of one example get to be handled before the checks.
SETTLE_S = 0.05
# Wall time of each fuzz test's examples (the examples after it do nothing), so that
# the module stays near a minute even when every message goes unanswered.
BUDGET_S = 22.0
# What the daemon runtime logs when the broker asks it to register again.
REREGISTER_ASKED = "the broker asked this daemon to register again"
# Fresh hosts the test may start (after a host that did not heal) before it stops.
MAX_FRESH_HOSTS = 3
# Every this many examples the check waits a few broker heartbeats first, so that a
# crash on a timer (the heartbeat, the dashboard publish) shows near its cause.
SLOW_CHECK_EVERY = 80
SLOW_CHECK_WAIT_S = 1.1

FUZZ = settings(max_examples=500, deadline=None, database=None, print_blob=False,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))

MISSING = object()
OPS = ("call", "cancel", "ping", "ps", "supervisor", "load", "unload", "pin", "unpin")
# Probe methods that answer at once; sleep, count, hold and crash are never called.
SAFE_METHODS = ("echo", "add", "info", "noted", "note", "fail", "dance", "")
UNSAFE_METHODS = {"sleep", "count", "hold", "crash", "release"}
LEGIT_KINDS = {"result", "error", "cancelled", "pong"}
TERMINAL = {"result", "error", "cancelled"}


# --- hostile values ------------------------------------------------------------------

EXT_REFS = [
    msgpack.ExtType(1, msgpack.packb(0)),  # frame 0: there is none in most messages
    msgpack.ExtType(1, msgpack.packb(9)),
    msgpack.ExtType(1, msgpack.packb(-1)),
    msgpack.ExtType(1, msgpack.packb("0")),
    msgpack.ExtType(1, b"\xc1"),  # not msgpack
    msgpack.ExtType(2, msgpack.packb([0, "<f4", [4]])),
    msgpack.ExtType(2, msgpack.packb([0, "no-such-dtype", [1]])),
    msgpack.ExtType(2, msgpack.packb("x")),
    msgpack.ExtType(7, b""),  # an unknown reference type
]
BIG_INTS = [2**63 - 1, 2**63, -2**63, 2**64 - 1, -1, 0, 2**53 + 1]
SPECIAL_FLOATS = [NAN, INF, -INF, -0.0, 5e-324, 1e308]


class Deep(object):
    """[[[...1...]]], `depth` arrays deep: packed by hand (see pack), since msgpack's own
    packer stops at 511 levels and its unpacker at 1024."""

    def __init__(self, depth):
        self.depth = depth

    def __repr__(self):
        return "[[...]]x{}".format(self.depth)


def pack(value):
    """msgpack bytes of `value`, where a Deep may nest deeper than msgpack packs."""
    return b"".join(_packed(value))


def _packed(value):
    if isinstance(value, Deep):
        return [b"\x91" * value.depth, b"\x01"]
    if isinstance(value, (dict, list)):
        count = len(value)
        small, short, long_ = (0x80, b"\xde", b"\xdf") if isinstance(value, dict) else \
            (0x90, b"\xdc", b"\xdd")
        head = bytes([small | count]) if count < 16 else \
            short + count.to_bytes(2, "big") if count < 2**16 else long_ + count.to_bytes(4, "big")
        parts = [head]
        items = value.items() if isinstance(value, dict) else ((item,) for item in value)
        for pair in items:
            for item in pair:
                parts += _packed(item)
        return parts
    return [msgpack.packb(value, use_bin_type=True)]


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-2**63, max_value=2**64 - 1), st.sampled_from(BIG_INTS),
    st.floats(), st.sampled_from(SPECIAL_FLOATS),
    st.binary(max_size=12), st.text(max_size=12), st.sampled_from(EXT_REFS))
hostile = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
# Nested ids and values: deeper than msgpack packs by default (511) but not deeper
# than it unpacks (1024), so they reach the receiver and come back in its reply.
deep = st.one_of(st.integers(min_value=2, max_value=1000),
                 st.sampled_from([511, 512, 513, 990, 1000, 1020])).map(Deep)
unhashable = st.one_of(st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3),
                                                                       scalars, max_size=2))
hostile_or_deep = st.one_of(hostile, hostile, deep, unhashable)

good_ids = st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1), st.text(max_size=20))
any_ids = st.one_of(good_ids, good_ids, hostile_or_deep, st.just(MISSING),
                    st.sampled_from([NAN, INF, True, 1.5, b"id", 2**64 - 1, "x" * 300]))


# --- what the broker must answer (decided from the frames alone) -----------------------

def id_class(value):
    """ok: the broker must name it in its reply; bad: it must not (None); either: may."""
    if value is MISSING or value is None or isinstance(value, (list, dict)):
        return "bad"
    if isinstance(value, float) and math.isnan(value):
        return "bad"
    if isinstance(value, str):
        return "ok" if len(value) <= 256 else "either"
    if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63:
        return "ok"
    return "either"  # bools, floats, bytes, payload references, uint64: a matter of schema


def _text_field(value):
    if value is MISSING or not isinstance(value, str):
        return "bad"
    return "ok"


def _optional(accepts):
    return lambda value: "ok" if value is MISSING or accepts(value) else "bad"


def _priority(value):
    if value is MISSING:
        return "ok"
    return "ok" if isinstance(value, str) and value in Priority.ALL else "bad"


def _timeout(value):
    if value is MISSING or value is None:
        return "ok"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "bad"
    if isinstance(value, float) and math.isnan(value):
        return "bad"
    if value <= 0:
        return "bad"
    return "either" if math.isinf(value) or value > 366 * 86400 else "ok"


def _ids_list(value):
    if value is MISSING:
        return "ok"
    if isinstance(value, list) and all(id_class(item) == "ok" for item in value):
        return "ok"
    return "either"


FIELD_RULES = {
    "call": {"model": _text_field, "method": _text_field,
             "args": _optional(lambda value: isinstance(value, dict)),
             "priority": _priority, "timeout": _timeout,
             "stream": lambda value: "ok" if value is MISSING or isinstance(value, bool)
             else "either"},
    "cancel": {},
    "ping": {"ids": _ids_list},
    "ps": {},
    # Only the broker's own supervisor may report: anything is refused or answered.
    "supervisor": {"processes": lambda value: "either"},
    "load": {"model": _text_field, "priority": _priority, "timeout": _timeout},
    "unload": {"model": _text_field, "priority": _priority, "timeout": _timeout},
    "pin": {"model": _text_field},
    "unpin": {"model": _text_field},
}
WORST = ("ok", "either", "bad")


class Expect(object):
    """reply: bad (an error with one of `codes`), legit (any reply naming the request),
    either (one of those), none (no reply of its own: a cancel), none_or_bad.
    id_rule, for an error reply: same (the request's id), none (None), same_or_none."""

    def __init__(self, reply, id_rule="none", request_id=None, codes=("bad_message",),
                 op="(no op)"):
        self.op = op
        self.reply = reply
        self.id_rule = id_rule
        self.request_id = request_id
        self.codes = codes

    @property
    def waits(self):
        return self.reply not in ("none", "none_or_bad")


def expectation(frames):
    """What the broker owes a client for `frames`, judged as the broker decodes them."""
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except Exception:
        return Expect("bad", op="(not msgpack)")
    if not isinstance(header, dict):
        return Expect("bad", op="(not a map)")
    request_id = header.get("id", MISSING)
    id_verdict = id_class(request_id)
    id_rule = {"ok": "same", "bad": "none", "either": "same_or_none"}[id_verdict]
    if header.get("v", MISSING) != V:  # v True or 1.0 is 1, to Python as to the broker
        return Expect("bad", id_rule, request_id, ("protocol_mismatch", "bad_message"),
                      "(another version)")
    op = header.get("op", MISSING)
    if not isinstance(op, str) or op not in FIELD_RULES:
        return Expect("bad", id_rule, request_id, op="(unknown op)")
    verdicts = [id_verdict] + [rule(header.get(field, MISSING))
                               for field, rule in FIELD_RULES[op].items()]
    if op == "supervisor":
        verdicts.append("either")
    worst = max(verdicts, key=WORST.index)
    codes = ("bad_message",)
    if op == "call" and "args" in header and not isinstance(header["args"], dict):
        codes = ("bad_message", "bad_arguments")
    if op == "cancel":
        return Expect({"ok": "none", "either": "none_or_bad", "bad": "bad"}[worst], id_rule,
                      request_id, op=op)
    return Expect({"ok": "legit", "either": "either", "bad": "bad"}[worst], id_rule,
                  request_id, codes, op)


def judge(expect, replies, waited=REPLY_WAIT_S):
    """(what is wrong, in a few words; the details) about `replies`, or None."""
    if expect.reply == "none":
        return ("an answer to a cancel of no request", _short(replies)) if replies else None
    if not replies:
        if expect.reply == "none_or_bad":
            return None
        return "no reply", "none within {:.1f}s".format(waited)
    first = replies[0]
    if not isinstance(first, dict):
        return "an undecodable reply", _short(first)
    kind = first.get("kind")
    bad = kind == "error" and first.get("code") in expect.codes
    if expect.reply in ("bad", "none_or_bad") and not bad:
        return "not an error {}".format("/".join(expect.codes)), _short(first)
    if expect.reply in ("legit", "either") and not bad and kind not in LEGIT_KINDS:
        return "an answer of unknown kind", _short(first)
    rid = first.get("id")
    rule = expect.id_rule if bad else "same"
    sent = expect.request_id
    if rule == "same" and not _same(rid, sent):
        return "the reply names another id", "{} instead of the request's {}: {}".format(
            _short(rid), _short(sent), _short(first))
    if rule == "none" and rid is not None:
        return "the reply echoes an unusable id instead of None", _short(first)
    if rule == "same_or_none" and rid is not None and not _same(rid, sent):
        return "the reply names another id", "{}, neither the request's {} nor None".format(
            _short(rid), _short(sent))
    terminal = [r for r in replies if isinstance(r, dict) and r.get("kind") in TERMINAL]
    if len(terminal) > 1:
        return "{} terminal replies".format(len(terminal)), _short(terminal)
    return None


def _same(a, b):
    try:
        return type(a) is type(b) and a == b
    except RecursionError:
        return False


def _short(value, limit=300):
    try:
        text = repr(value)
    except RecursionError:
        text = "<a value nested too deep to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- frontend messages ---------------------------------------------------------------

def _base(op, request_id):
    header = {"v": V, "op": op}
    if request_id is not MISSING:
        header["id"] = request_id
    if op == "call":
        header.update(model="probe", method="echo", args={"data": b"x"}, priority="normal",
                      timeout=10.0, stream=False)
    elif op == "ping":
        header["ids"] = [1, "a"]
    elif op == "supervisor":
        header.update(token="not-the-token", processes={
            "probe": {"status": "running", "pid": 1, "restarts": 0, "error": None}})
    elif op in ("load", "pin", "unpin"):
        header["model"] = "probe"
    elif op == "unload":
        header["model"] = "nope"  # never unload the real daemon
    return header


field_values = {
    "model": st.one_of(st.sampled_from(["probe", "nope", ""]),
                       st.text(max_size=8).filter(lambda t: t != "ghost"), hostile_or_deep),
    "method": st.one_of(st.sampled_from(SAFE_METHODS),
                        st.text(max_size=8).filter(lambda t: t not in UNSAFE_METHODS),
                        hostile_or_deep),
    "args": st.one_of(
        st.dictionaries(st.sampled_from(["data", "a", "b", "tag", "x"]), hostile_or_deep,
                        max_size=3),
        st.sampled_from([{"data": ref} for ref in EXT_REFS]), hostile_or_deep),
    "priority": st.one_of(st.sampled_from(Priority.ALL + ("urgent", "")), hostile),
    "timeout": st.one_of(st.sampled_from([0, -1, 0.001, 5.0, 1e9, NAN, INF, -INF, True, "5"]),
                         hostile),
    "stream": st.one_of(st.booleans(), hostile),
    "ids": st.one_of(st.lists(any_ids.filter(lambda v: v is not MISSING), max_size=4), hostile),
    "processes": st.one_of(
        st.dictionaries(st.sampled_from(["probe", "ghost", "nope"]) | hostile.filter(
            lambda v: isinstance(v, str)), hostile, max_size=3),
        st.dictionaries(st.sampled_from(["probe", "ghost"]), st.fixed_dictionaries(
            {"status": st.sampled_from(["running", "stopped", "failed", "backoff"]) | hostile,
             "pid": hostile, "restarts": hostile, "error": hostile}), max_size=2),
        hostile),
    "token": st.one_of(st.text(max_size=40), hostile),
    "v": st.one_of(st.sampled_from([0, 2, 999, "1", [1], None, NAN, -1, 2**64 - 1]), hostile),
    "op": st.one_of(st.sampled_from(["dance", "CALL", "", "register", "state", "heartbeat"]),
                    hostile),
    "extra": hostile_or_deep,
}
MUTABLE = {
    "call": ["id", "model", "method", "args", "priority", "timeout", "stream"],
    "cancel": ["id"],
    "ping": ["id", "ids"],
    "ps": ["id"],
    "supervisor": ["id", "processes", "token"],
    "load": ["id", "model", "priority", "timeout"],
    "unload": ["id", "model", "priority", "timeout"],
    "pin": ["id", "model"],
    "unpin": ["id", "model"],
}


@st.composite
def op_header(draw):
    """A header of one of the ops, with some fields of the wrong type or missing."""
    op = draw(st.sampled_from(OPS))
    header = _base(op, draw(st.one_of(good_ids, any_ids)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        field = draw(st.sampled_from(MUTABLE[op] + ["v", "op", "extra"]))
        if field == "id":
            value = draw(any_ids)
        else:
            value = draw(st.one_of(field_values[field], st.just(MISSING)))
        if value is MISSING:
            header.pop(field, None)
        else:
            header[field] = value
    if header.get("op") == "unload" and header.get("model") == "probe":
        header["model"] = "nope"
    if header.get("op") in ("call", "load", "unload") and header.get("model") == "ghost":
        header["model"] = "nope"  # a call to a daemon that never starts waits, by design
    return pack(header)


def _craft_deep_header(depth):
    # {"v": 1, "op": "ps", "id": [[[...]]]}, packed by hand: deeper than any packer goes.
    return (b"\x83" + pack("v") + pack(V) + pack("op") + pack("ps") + pack("id")
            + b"\x91" * depth + b"\xc0")


raw_headers = st.one_of(
    st.binary(max_size=64),
    st.just(b""),
    st.builds(pack, hostile.filter(lambda v: not isinstance(v, dict))),
    st.builds(pack, deep),
    st.integers(min_value=1, max_value=200000).map(lambda n: b"\x91" * n + b"\xc0"),
    st.one_of(st.integers(min_value=1, max_value=3000),
              st.sampled_from([511, 512, 990, 1020, 1023, 1024, 1025])).map(_craft_deep_header),
    # Keys that are not strings: msgpack refuses to unpack such a map.
    st.builds(lambda key: msgpack.packb({key: 1, "v": V, "op": "ps", "id": 1}),
              st.integers(-2**63, 2**63 - 1) | st.booleans() | st.none()
              | st.floats(allow_nan=False)),
)
extra_frames = st.lists(st.binary(max_size=64), max_size=3)


@st.composite
def frontend_message(draw):
    header = draw(st.one_of(op_header(), op_header(), op_header(), raw_headers))
    return [header] + draw(extra_frames)


# --- backend messages ----------------------------------------------------------------

class Token(object):
    """A value known only when the example runs: pids and identities."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "<{}>".format(self.name)


PID_SELF, PID_DEAD, PID_REAL = Token("test's pid"), Token("a dead pid"), Token("real pid")
IDENTITY, VICTIM, STRANGER = Token("own identity"), Token("bystander"), Token("stranger")

pids = st.one_of(st.sampled_from([PID_SELF, PID_DEAD, PID_REAL, 0, -1, 1, 2**63 - 1,
                                  2**64 - 1]), hostile)
states = st.one_of(st.sampled_from(DaemonState.__dict__.get("ALL") or (
    "starting", "loading", "ready", "busy", "unloaded", "failed", "crashed", "stopped")),
    hostile_or_deep)
tiers = st.one_of(st.sampled_from(Tier.ALL), hostile)
mems = st.one_of(
    st.dictionaries(st.sampled_from(["rss", "rss_peak", "cuda", "cuda_peak"]) | st.text(
        max_size=4), hostile, max_size=4),
    st.sampled_from([{"rss": "lots"}, {"rss": -1}, {"rss": NAN}, {"rss": [1]},
                     {"cuda": {"a": 1}}, {"rss": 2**64 - 1}]),
    hostile)
running_calls = st.one_of(
    st.lists(st.fixed_dictionaries(
        {"id": st.integers(0, 9) | hostile, "client": st.just(STRANGER) | hostile,
         "method": st.just("echo") | hostile, "slot": st.integers(-1, 3) | hostile}),
        max_size=3),
    hostile)
REGISTER_FIELDS = {
    "name": st.one_of(st.sampled_from(["ghost", "ghost", "probe", "probe", "nope", ""]),
                      hostile),
    "pid": pids,
    "slots": st.one_of(st.lists(st.sampled_from([IDENTITY, b"nobody", b""]) | hostile,
                                max_size=4), hostile),
    "methods": st.one_of(st.lists(st.text(max_size=6) | hostile, max_size=3), hostile),
    "state": states, "tier": tiers,
    "tiers": st.one_of(st.lists(tiers, max_size=4), hostile),
    "mem": mems, "running": running_calls,
    "error": hostile, "facts": hostile_or_deep, "loads": hostile, "uptime_s": hostile,
    "interpreter": hostile, "python": hostile, "engine": hostile,
}
STATE_FIELDS = {"state": states, "tier": tiers, "took_s": hostile, "mem": mems,
                "loads": hostile, "facts": hostile_or_deep, "error": hostile,
                "failed": tiers}
HEARTBEAT_FIELDS = {"state": states, "running": hostile, "mem": mems}
REPLY_FIELDS = {
    "kind": st.one_of(st.sampled_from(["partial", "progress", "result", "error",
                                       "cancelled", "pong"]), hostile),
    "id": st.one_of(st.integers(1000, 1010), hostile_or_deep),
    "client": st.one_of(st.sampled_from([VICTIM, VICTIM, STRANGER]), hostile),
    "value": hostile_or_deep, "code": hostile, "message": hostile, "mem": mems,
    "seq": hostile, "fraction": hostile, "details": hostile,
}


@st.composite
def mutated(draw, base, fields, at_most=4, at_least=0):
    header = dict(base)
    for _ in range(draw(st.integers(min_value=at_least, max_value=at_most))):
        field = draw(st.sampled_from(sorted(fields)))
        value = draw(st.one_of(fields[field], st.just(MISSING)))
        if value is MISSING:
            header.pop(field, None)
        else:
            header[field] = value
    return header


def _register_base(name):
    return {"v": V, "op": "register", "name": name, "pid": PID_SELF, "interpreter": "fake",
            "python": "3.12.0", "engine": "fake:Fake", "methods": ["echo"],
            "slots": [IDENTITY], "state": "ready", "tier": "resident",
            "tiers": ["resident", "unloaded"],
            "mem": {"rss": 1000, "rss_peak": 1000, "cuda": None, "cuda_peak": None},
            "error": None, "facts": {}, "loads": 1, "uptime_s": 1.0, "running": []}


@st.composite
def register_message(draw):
    name = draw(REGISTER_FIELDS["name"])
    # Whose pid it claims matters most when the name is the real daemon's.
    base = dict(_register_base(name), pid=draw(st.sampled_from([PID_SELF, PID_REAL, PID_DEAD])))
    return draw(mutated(base, REGISTER_FIELDS, at_most=3))


@st.composite
def backend_message(draw, at_least=0):
    kind = draw(st.sampled_from(["state", "heartbeat", "reply", "reply", "garbage", "op"]))
    if kind == "state":
        base = {"v": V, "op": "state", "state": "ready", "tier": "resident", "took_s": 0.1,
                "mem": {"rss": 1000}, "loads": 1, "facts": {}, "error": None, "failed": None}
        header = draw(mutated(base, STATE_FIELDS, at_least=at_least))
    elif kind == "heartbeat":
        base = {"v": V, "op": "heartbeat", "state": "ready", "running": 0, "mem": {"rss": 1}}
        header = draw(mutated(base, HEARTBEAT_FIELDS, at_least=at_least))
    elif kind == "reply":
        base = {"v": V, "kind": "result", "id": 1000, "client": VICTIM, "value": "forged",
                "mem": {"rss_peak": 1}}
        header = draw(mutated(base, REPLY_FIELDS, at_least=at_least))
    elif kind == "op":
        header = {"v": V, "op": draw(field_values["op"]), "id": draw(any_ids.filter(
            lambda v: v is not MISSING))}
    else:
        return [draw(raw_headers)] + draw(extra_frames)
    if draw(st.integers(0, 5)) == 0:
        header["v"] = draw(field_values["v"])
    return [header] + draw(extra_frames)


@st.composite
def backend_example(draw):
    """The messages of one fake peer: either a daemon the broker knows (a well-formed
    register as `ghost`) that then sends hostile state, heartbeat and reply messages,
    or a peer that may try a hostile register under any name first."""
    if draw(st.booleans()):
        register = dict(_register_base("ghost"), pid=PID_SELF)
        return [[register]] + draw(st.lists(backend_message(at_least=1), min_size=1,
                                            max_size=6))
    messages = []
    if draw(st.booleans()):
        messages.append([draw(register_message())] + draw(extra_frames))
    messages += draw(st.lists(backend_message(), min_size=1, max_size=6))
    return messages


# Shapes that broke a broker once, tried first in every run (hypothesis' explicit
# examples) so that no run depends on drawing them again.
def _call(**fields):
    return [pack(dict({"v": V, "op": "call", "id": 1, "model": "probe", "method": "echo",
                       "args": {"data": b"x"}}, **fields))]


KNOWN_FRONTEND = [
    _call(timeout=NAN),
    _call(id=Deep(600)),  # deeper than msgpack packs: an error reply echoing it fails
    [pack({"v": V, "op": "cancel", "id": [1]})],
    [pack({"v": V, "op": "ping", "id": "p", "ids": [[1], {"a": 1}]})],
    [pack({"v": V, "op": "pin", "id": 2, "model": [1]})],
    [pack({"v": V, "op": "supervisor", "id": 3, "processes": {"probe": [1]}})],
    [pack({"v": 2, "op": "ps", "id": Deep(600)})],
    [_craft_deep_header(1020)],  # repr() of it exceeds Python's recursion limit
    # Never equal to itself: a broker that takes it cannot match the daemon's reply to
    # its request, and the slot stays taken. Last: it costs a fresh host where it bites.
    _call(id=NAN),
]
_GHOST = dict(_register_base("ghost"), pid=PID_SELF)
KNOWN_BACKEND = [
    [[_GHOST], [{"v": V, "op": "state", "state": ["ready"], "tier": "resident"}]],
    [[dict(_GHOST, pid=PID_DEAD)], [{"v": V, "op": "heartbeat", "mem": {"rss": "lots"}}]],
    [[dict(_register_base("probe"), pid=PID_REAL)]],
    [[{"v": V, "kind": "result", "id": 1000, "client": VICTIM, "value": "forged"}]],
]


# --- the host, the checks, the record --------------------------------------------------

def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


class FuzzHost(object):
    """The module's host, what it should look like, and every violation seen."""

    def __init__(self):
        self.context = zmq.Context()
        self.host = None
        self.counter = 0
        self.sent = {"frontend": 0, "backend": 0}
        self.examples = {"frontend": 0, "backend": 0}
        self.restarts = 0
        self.dead_pid = _dead_pid()
        self.victim = None
        self.start()

    def start(self):
        self.host = Host([daemon_yaml("probe", concurrency=1, max_queue=8, max_payload="32MiB"),
                          daemon_yaml("ghost", autostart="false")]).start()
        self.host.wait_ready("probe")
        self._baseline()
        self.log_mark = self.asked_mark = len(self.host.log())
        # The bystander: a client that sends nothing, so whatever reaches it was misrouted.
        if self.victim is not None:
            self.victim.close(linger=0)
        self.victim_identity = "fz-bystander-{}-{}".format(os.getpid(), self.restarts).encode()
        self.victim = self.socket(self.host.endpoint, self.victim_identity)

    def _baseline(self):
        status = self.host.ps()
        self.broker_pid = status["broker"]["pid"]
        self.daemon_pid = self._row(status)["pid"]
        self.daemon_is = self._who(self._row(status))

    @staticmethod
    def _who(row):
        # A fake that registers under the real daemon's name with the real pid still
        # differs in what it says it runs.
        return row["pid"], row["interpreter"], row["engine"], row["methods"]

    @staticmethod
    def _row(status):
        return next(d for d in status["daemons"] if d["name"] == "probe")

    def stop(self):
        if self.victim is not None:
            self.victim.close(linger=0)
        self.host.stop()
        self.context.destroy(linger=0)

    def socket(self, endpoint, identity=None):
        sock = self.context.socket(zmq.DEALER)
        self.counter += 1
        sock.setsockopt(zmq.ROUTING_ID, identity or "fz-{}-{}".format(
            os.getpid(), self.counter).encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    @property
    def backend(self):
        return "ipc://{}/backend.sock".format(self.host.runtime)

    def new_log(self):
        """Errors, warnings and tracebacks the host logged since the last look; a warning
        or error that repeats (the same words after the time) only once."""
        text = self.host.log()
        fresh, self.log_mark = text[self.log_mark:], len(text)
        keep, seen = [], set()
        for line in fresh.splitlines():
            if not line[:4].isdigit():
                keep.append(line)  # not a log record: a traceback's lines
            elif " ERROR " in line or " WARNING " in line or " CRITICAL " in line:
                words = line.split(" ", 1)[-1]
                if words not in seen:
                    seen.add(words)
                    keep.append(line)
        return keep

    def health(self, wait=REPLY_WAIT_S):
        """Problems with the host (broker, real daemon, a real call), as sentences."""
        problems = []
        client = modelhost.Client(self.host.endpoint, broker_timeout=wait)
        try:
            try:
                status = client.ps(timeout=wait)
            except Exception as exc:  # not only ModelhostError: what the client raised
                return ["ps did not answer: {}: {}".format(type(exc).__name__,
                                                           _short(str(exc)))]
            if status["broker"]["pid"] != self.broker_pid:
                problems.append("the broker is another process: pid {}, was {} (it died and "
                                "the supervisor started it again)".format(
                                    status["broker"]["pid"], self.broker_pid))
            row = self._row(status)
            if self._who(row) != self.daemon_is or row["state"] not in ("ready", "busy"):
                problems.append("the real daemon is {} as {} (it was {}{})".format(
                    row["state"], _short(self._who(row)), _short(self.daemon_is),
                    "" if pid_alive(self.daemon_pid) else "; its process died"))
            # A broker that took a fake for the real daemon drops the real one's
            # registration, and asks it to register again when it next hears from it
            # (a fake with the real pid looks the same in ps once that is done).
            text = self.host.log()
            asked = [line for line in text[self.asked_mark:].splitlines()
                     if "daemon=probe" in line and REREGISTER_ASKED in line]
            self.asked_mark = len(text)
            if asked and status["broker"]["pid"] == self.broker_pid:
                problems.append("the broker forgot the real daemon's registration without "
                                "restarting: {}".format(asked[0]))
            data = os.urandom(16) + b"\0fuzz"
            try:
                value = client.call("probe", "echo", data=data, timeout=wait)
                if value != {"data": data, "extra": {}}:
                    problems.append("a real echo returned {}".format(_short(value)))
            except Exception as exc:
                problems.append("a real echo failed: {}: {}".format(type(exc).__name__,
                                                                    _short(str(exc))))
        finally:
            client.close()
        return problems

    def put_right(self):
        """After a failed check: wait for the host to heal (a restarted broker, a daemon
        that re-registers), then take it as the new normal; a fresh host if it does not."""
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            try:
                status = self.host.ps()
                row = self._row(status)
                if row["state"] in ("ready", "busy") and (
                        self._who(row) == self.daemon_is or not pid_alive(self.daemon_pid)):
                    self.broker_pid = status["broker"]["pid"]
                    self.daemon_pid = row["pid"]
                    self.daemon_is = self._who(row)
                    time.sleep(SLOW_CHECK_WAIT_S)  # the real daemon's next word
                    self.asked_mark = len(self.host.log())
                    if not self.health(wait=2.0):
                        return "healed"
            except Exception:  # a broker still down, or a ps its client cannot read
                pass
            time.sleep(0.3)
        self.host.stop()
        self.restarts += 1
        self.start()
        return "did not heal within 6s: the test started a fresh host"

    def drain_victim(self):
        got = []
        while self.victim.poll(0):
            got.append(self.victim.recv_multipart())
        return got


class Record(object):
    """One fuzz test's examples and violations."""

    def __init__(self, fuzz, side):
        self.fuzz = fuzz
        self.side = side
        self.deadline = time.monotonic() + BUDGET_S
        self.violations = []
        self.recent = []  # the last few examples, for a failure seen only later
        self.skipped = 0

    def out_of_time(self):
        # A broker that breaks again after every fresh host: the violations say why.
        if time.monotonic() > self.deadline or self.fuzz.restarts >= MAX_FRESH_HOSTS:
            self.skipped += 1
            return True
        return False

    def add(self, what, example, **details):
        self.violations.append(dict(what=what, example=example, log=self.fuzz.new_log(),
                                    **details))

    def example_done(self, example):
        fuzz = self.fuzz
        fuzz.examples[self.side] += 1
        self.recent = (self.recent + [example])[-3:]
        if fuzz.examples[self.side] % SLOW_CHECK_EVERY == 0:
            time.sleep(SLOW_CHECK_WAIT_S)
        for message in fuzz.drain_victim():
            self.add("a client that sent nothing received a message", example,
                     received=_short([_decode(frame) for frame in message[:1]]))
        problems = fuzz.health()
        if problems:
            self.add("the host is not as it was", list(self.recent), problems=problems,
                     outcome=fuzz.put_right())

    def finish(self):
        fuzz = self.fuzz
        time.sleep(SLOW_CHECK_WAIT_S)
        problems = fuzz.health()
        if problems:
            self.add("the host is not as it was at the end", list(self.recent),
                     problems=problems, outcome=fuzz.put_right())
        print("fuzz {}: {} messages in {} examples ({} examples skipped past the {:.0f}s "
              "budget or {} fresh hosts), {} violations".format(
                  self.side, fuzz.sent[self.side], fuzz.examples[self.side], self.skipped,
                  BUDGET_S, MAX_FRESH_HOSTS, len(self.violations)))
        if self.violations:
            pytest.fail(self.report(), pytrace=False)

    def report(self):
        by_kind = {}
        for violation in self.violations:
            by_kind.setdefault(violation["what"], []).append(violation)
        lines = ["{} violations on the {} in {} examples ({} messages):".format(
            len(self.violations), self.side, self.fuzz.examples[self.side],
            self.fuzz.sent[self.side])]
        for key, group in sorted(by_kind.items(), key=lambda item: -len(item[1])):
            lines.append("")
            lines.append("== {} x {}".format(len(group), key))
            for violation in group[:3]:
                for name, value in violation.items():
                    if name in ("what", "log"):
                        continue
                    lines.append("   {}: {}".format(name, value if isinstance(value, str)
                                                    else _short(value, 600)))
                for line in violation["log"][:40]:
                    lines.append("   | " + line)
                lines.append("   --")
        return "\n".join(lines)


def _decode(frame):
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return frame


@pytest.fixture(scope="module")
def fuzz(request):
    fuzz = FuzzHost()
    yield fuzz
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    line = ("fuzz total: {} frontend + {} backend = {} messages in {} examples; the test "
            "restarted the host {} times".format(
                fuzz.sent["frontend"], fuzz.sent["backend"],
                fuzz.sent["frontend"] + fuzz.sent["backend"],
                fuzz.examples["frontend"] + fuzz.examples["backend"], fuzz.restarts))
    if reporter is not None:
        reporter.write_line(line)
    else:
        print(line)
    fuzz.stop()


# --- the tests -----------------------------------------------------------------------

def test_frontend_fuzz(fuzz, capsys):
    record = Record(fuzz, "frontend")
    silent = {}  # op -> messages of it that went unanswered

    @given(st.lists(frontend_message(), min_size=1, max_size=4))
    def one(messages):
        if record.out_of_time():
            return
        sockets = [fuzz.socket(fuzz.host.endpoint) for _ in messages]
        expects = [expectation(frames) for frames in messages]
        waits = [REPLY_WAIT_S if silent.get(expect.op, 0) < SILENCES_TRUSTED else
                 QUICK_WAIT_S for expect in expects]
        try:
            for sock, frames in zip(sockets, messages):
                sock.send_multipart(frames)
                fuzz.sent["frontend"] += 1
            replies = _collect(sockets, expects, waits)
        finally:
            for sock in sockets:
                sock.close(linger=0)
        for frames, expect, got, wait in zip(messages, expects, replies, waits):
            problem = judge(expect, got, wait)
            if problem and problem[0].startswith("no reply"):
                silent[expect.op] = silent.get(expect.op, 0) + 1
            if problem:
                record.add("{} [{}]".format(problem[0], expect.op), _short(frames, 400),
                           got=problem[1], expected="{} (error id: {}; codes {})".format(
                               expect.reply, expect.id_rule, "/".join(expect.codes)))
        record.example_done([_short(frames, 200) for frames in messages])

    for known in reversed(KNOWN_FRONTEND):
        one = example([known])(one)
    FUZZ(one)()
    with capsys.disabled():
        record.finish()


def _collect(sockets, expects, waits):
    """Decoded replies per socket: until each waiting socket has its answer, or its bound."""
    replies = [[] for _ in sockets]
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    start = time.monotonic()
    waiting = {index: start + wait for index, (expect, wait) in enumerate(zip(expects, waits))
               if expect.waits}
    index_of = {sock: index for index, sock in enumerate(sockets)}
    grace_until = None
    while True:
        now = time.monotonic()
        for index in [index for index, until in waiting.items() if now >= until]:
            del waiting[index]
        if not waiting and grace_until is None:
            grace_until = now + 0.02  # a second terminal reply, or an answer to a cancel
        end = grace_until if grace_until is not None else min(waiting.values())
        if now >= end:
            break
        for sock, _ in poller.poll(max(0.0, end - now) * 1000):
            while sock.poll(0):
                header = _decode(sock.recv_multipart()[0])
                index = index_of[sock]
                replies[index].append(header)
                if isinstance(header, dict) and header.get("kind") in LEGIT_KINDS:
                    waiting.pop(index, None)
    return replies


def _resolve(value, fuzz, identity):
    if isinstance(value, Token):
        return {PID_SELF: os.getpid(), PID_DEAD: fuzz.dead_pid, PID_REAL: fuzz.daemon_pid,
                IDENTITY: identity, VICTIM: fuzz.victim_identity,
                STRANGER: b"fz-stranger-nobody"}[value]
    if isinstance(value, dict):
        return {key: _resolve(item, fuzz, identity) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, fuzz, identity) for item in value]
    return value


def _names_ghost(messages):
    return any(isinstance(frames[0], dict) and frames[0].get("op") == "register"
               and frames[0].get("name") == "ghost" for frames in messages)


def test_backend_fuzz(fuzz, capsys):
    record = Record(fuzz, "backend")

    @given(backend_example())
    def one(messages):
        if record.out_of_time():
            return
        if _names_ghost(messages):
            # A peer registered as `ghost` is a daemon to the broker: replies from its
            # slots for requests the broker does not know may be results that crossed
            # a broker restart. The bystander is kept out of those examples.
            messages = [[_replace(frames[0], VICTIM, STRANGER)] + frames[1:]
                        for frames in messages]
        sock = fuzz.socket(fuzz.backend)
        identity = sock.getsockopt(zmq.ROUTING_ID)
        sent = []
        try:
            for frames in messages:
                header = frames[0]
                if not isinstance(header, bytes):
                    header = pack(_resolve(header, fuzz, identity))
                sent.append([header] + frames[1:])
                sock.send_multipart(sent[-1])
                fuzz.sent["backend"] += 1
            time.sleep(SETTLE_S)
        finally:
            sock.close(linger=0)
        record.example_done([_short([_decode(f) for f in frames], 300) for frames in sent])

    for known in reversed(KNOWN_BACKEND):
        one = example(known)(one)
    FUZZ(one)()
    with capsys.disabled():
        record.finish()


def _replace(value, old, new):
    if value is old:
        return new
    if isinstance(value, dict):
        return {key: _replace(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace(item, old, new) for item in value]
    return value


def test_a_forged_reply_for_another_clients_running_call_is_never_delivered(fuzz):
    """A running call's client hears only from the slot its call went to."""
    caller = fuzz.socket(fuzz.host.endpoint)
    stranger = fuzz.socket(fuzz.backend)  # never registers
    fake = fuzz.socket(fuzz.backend)  # registers as ghost, a daemon the broker knows
    caller_identity = caller.getsockopt(zmq.ROUTING_ID)
    fake_identity = fake.getsockopt(zmq.ROUTING_ID)
    try:
        fake.send_multipart([pack(dict(_register_base("ghost"), pid=os.getpid(),
                                       slots=[fake_identity]))])
        caller.send_multipart(protocol.encode({"op": "call", "id": 1, "model": "probe",
                                               "method": "sleep", "args": {"seconds": 1.0}}))
        fuzz.host.wait_for(lambda s: FuzzHost._row(s)["state"] == "busy", 10,
                           "the call to start")
        for peer in (stranger, fake):
            for kind, extra in (("partial", {"seq": 0, "value": "forged"}),
                                ("progress", {"fraction": 0.5, "message": "forged"}),
                                ("error", {"code": "engine_error", "message": "forged"}),
                                ("cancelled", {"message": "forged"}),
                                ("result", {"value": "forged"})):
                peer.send_multipart(protocol.encode(dict(extra, kind=kind, id=1,
                                                         client=caller_identity)))
        got = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if caller.poll(100):
                got.append(_decode(caller.recv_multipart()[0]))
                if got[-1].get("kind") in TERMINAL:
                    break
        time.sleep(0.5)  # a second terminal reply would be here by now
        while caller.poll(0):
            got.append(_decode(caller.recv_multipart()[0]))
    finally:
        for sock in (caller, stranger, fake):
            sock.close(linger=0)
    forged = [header for header in got if "forged" in repr(header)]
    terminal = [header for header in got if header.get("kind") in TERMINAL]
    assert not forged, "forged replies reached the caller:\n{}\n{}".format(
        _short(forged, 2000), "\n".join(fuzz.new_log()[-30:]))
    assert len(terminal) == 1 and terminal[0]["kind"] == "result" \
        and terminal[0]["value"] == 1.0, _short(got, 2000)


@pytest.mark.parametrize("pid", ["the test's", "the real daemon's", "a dead one"])
def test_a_register_under_the_live_daemons_name_is_refused(fuzz, pid):
    """Another process registering as `probe` while the real one lives takes nothing."""
    fake = fuzz.socket(fuzz.backend)
    identity = fake.getsockopt(zmq.ROUTING_ID)
    number = {"the test's": os.getpid(), "the real daemon's": fuzz.daemon_pid,
              "a dead one": fuzz.dead_pid}[pid]
    client = modelhost.Client(fuzz.host.endpoint)
    try:
        fake.send_multipart([pack(dict(_register_base("probe"), pid=number, slots=[identity],
                                       methods=["echo", "info"]))])
        # Soon after (the broker handles it in microseconds), and well before the real
        # daemon's next heartbeat would show a broker that took the fake for it.
        time.sleep(0.05)
        who = FuzzHost._who(FuzzHost._row(fuzz.host.ps()))
        # The call must go to the real daemon, never to the fake's slot (which never answers).
        try:
            answer = client.call("probe", "info", timeout=5)["pid"]
        except modelhost.ModelhostError as exc:
            answer = exc
    finally:
        fake.close(linger=0)
        client.close()
    log = "\n".join(fuzz.new_log()[-20:])
    problems = fuzz.health()
    if who != fuzz.daemon_is or answer != fuzz.daemon_pid or problems:
        outcome = fuzz.put_right()
        pytest.fail("after a register as probe from pid {} ({}), ps shows probe as {} (the real "
                    "one is {}); a call to it answered {!r}; checks: {}; {}\n{}".format(
                        number, pid, who, fuzz.daemon_is, answer, problems, outcome, log),
                    pytrace=False)
