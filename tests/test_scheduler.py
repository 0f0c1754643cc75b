"""Tests of modelhost.broker.scheduler, one decision per test.

The scheduler is driven synchronously: a fake clock that tests advance by
hand, and a RecordingEffects that records what the scheduler asked for. No
threads, no sleeps, no sockets.
"""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelhost.broker.pump import DISPATCH_RETRY_S
from modelhost.broker.scheduler import Request, RequestState, Scheduler
from modelhost.broker.scheduler_types import Route
from modelhost.broker.transitions import Cause, IllegalTransition, transition
from modelhost.errors import UnknownModel
from modelhost.protocol import DaemonState, Priority

from fakes import FakeClock, RecordingEffects, make_config

ALICE = b"client-alice"
BOB = b"client-bob"
TTS_METHODS = ["clone", "speak"]


class Harness:
    """A scheduler serving one daemon, `tts`, plus the small verbs the tests speak in."""

    def __init__(self, concurrency=1, max_queue=64, max_payload_bytes=1000):
        self.clock = FakeClock()
        self.effects = RecordingEffects()
        self.scheduler = Scheduler(
            make_config({"tts": dict(concurrency=concurrency, max_queue=max_queue,
                                     max_payload_bytes=max_payload_bytes)},
                        heartbeat_s=1.0, liveness=3, client_liveness_s=10.0),
            self.effects, self.clock)
        self.tts = self.scheduler.daemons["tts"]

    def call(self, rid, model="tts", method="speak", client=ALICE, priority=Priority.NORMAL,
             timeout=None, payload_bytes=0):
        request = Request(client=client, id=rid, model=model, method=method,
                          forward={"method": method, "args": {}, "stream": False}, payloads=[],
                          payload_bytes=payload_bytes, priority=priority,
                          deadline=None if timeout is None else self.clock() + timeout)
        self.scheduler.on_client_seen(client)
        self.scheduler.on_call(request)
        return request

    def register(self, pid=100, state=DaemonState.READY, **info):
        """Register `tts` as the runtime does: a control socket and one socket per slot."""
        concurrency = self.tts.config.concurrency
        info = dict({"pid": pid, "methods": TTS_METHODS, "state": state,
                     "slots": [b"tts:%d:s%d" % (pid, i) for i in range(concurrency)]}, **info)
        return self.scheduler.on_daemon_registered("tts", b"tts:%d:control" % pid, info)

    def reply(self, rid, terminal=True, client=ALICE, name="tts"):
        """Whether the daemon's reply goes on to the client (now, or when its ping asks)."""
        return self.scheduler.on_reply(name, client, rid, terminal).route is not Route.DROP

    def take(self):
        return self.effects.take()


@pytest.fixture
def h():
    return Harness()


@pytest.fixture
def ready():
    """A harness whose daemon is registered and ready, with no effects recorded yet."""
    harness = Harness()
    harness.register()
    harness.take()
    return harness


# --- admission -----------------------------------------------------------------


def test_call_to_unknown_model_fails_at_once(h):
    h.call(1, model="nope")
    assert h.take() == [("reply_error", 1, "unknown_model")]
    assert "'nope'" in h.effects.messages[1] and "tts" in h.effects.messages[1]
    assert h.scheduler.requests == {}


def test_calls_before_registration_are_queued_whatever_their_method(h):
    h.call(1, method="sing")
    assert h.take() == []
    assert h.tts.queued() == 1


def test_unknown_method_rejected_after_registration(ready):
    ready.call(1, method="sing")
    assert ready.take() == [("reply_error", 1, "unknown_method")]
    assert "'sing'" in ready.effects.messages[1]
    assert "clone, speak" in ready.effects.messages[1]
    assert not ready.scheduler.knows(ALICE, 1)


def test_payload_over_limit_rejected(ready):
    ready.call(1, payload_bytes=1001)
    assert ready.take() == [("reply_error", 1, "payload_too_large")]
    assert "1001" in ready.effects.messages[1] and "1000" in ready.effects.messages[1]


def test_payload_at_limit_accepted(ready):
    ready.call(1, payload_bytes=1000)
    assert ready.take() == [("dispatch", "tts", 1)]


def test_full_queue_answers_over_capacity():
    h = Harness(max_queue=2)  # never registered: nothing leaves the queue
    for rid in (1, 2):
        h.call(rid)
    assert h.take() == []
    h.call(3)
    assert h.take() == [("reply_error", 3, "over_capacity")]
    assert h.tts.queued() == 2
    assert not h.scheduler.knows(ALICE, 3)


def test_duplicate_request_id_rejected(ready):
    ready.call(1)
    ready.call(1)
    assert ready.take() == [("dispatch", "tts", 1), ("reply_error", 1, "bad_message")]
    assert "already in use" in ready.effects.messages[1]
    # The first call is untouched: its reply still goes through.
    assert ready.scheduler.knows(ALICE, 1)
    assert ready.reply(1) is True


def test_same_request_id_from_another_client_is_a_different_request(ready):
    ready.call(1, client=ALICE)
    ready.call(1, client=BOB)
    assert ready.take() == [("dispatch", "tts", 1)]
    assert ready.tts.queued() == 1


# --- dispatch order ------------------------------------------------------------


def test_dispatch_respects_concurrency_limit():
    h = Harness(concurrency=2)
    h.register()
    for rid in (1, 2, 3):
        h.call(rid)
    assert h.take() == [("dispatch", "tts", 1), ("dispatch", "tts", 2)]
    assert len(h.tts.running) == 2 and h.tts.queued() == 1
    assert h.reply(1, terminal=False) is True  # a partial chunk frees nothing
    assert h.take() == []
    assert h.reply(1) is True
    assert h.take() == [("dispatch", "tts", 3)]


def test_interactive_overtakes_queued_batch(ready):
    ready.call(1)
    ready.call(2, priority=Priority.BATCH)
    ready.call(3, priority=Priority.NORMAL)
    ready.call(4, priority=Priority.INTERACTIVE)
    assert ready.take() == [("dispatch", "tts", 1)]
    for rid in (1, 4, 3):
        ready.reply(rid)
    assert ready.take() == [("dispatch", "tts", 4), ("dispatch", "tts", 3),
                            ("dispatch", "tts", 2)]


def test_fifo_within_a_priority(ready):
    for rid in (1, 2, 3, 4):
        ready.call(rid, priority=Priority.BATCH)
    for rid in (1, 2, 3):
        ready.reply(rid)
    assert ready.take() == [("dispatch", "tts", rid) for rid in (1, 2, 3, 4)]


def test_each_running_call_has_a_slot_of_its_own():
    h = Harness(concurrency=2)
    h.register()
    first, second, third = h.call(1), h.call(2), h.call(3)
    assert (first.slot, second.slot, third.slot) == (0, 1, None)
    h.reply(1)
    assert third.slot == 0
    assert h.tts.slots == [b"tts:100:s0", b"tts:100:s1"]


def test_daemon_without_slot_sockets_is_dispatched_through_its_control_socket():
    h = Harness(concurrency=2)
    h.scheduler.on_daemon_registered("tts", b"tts:100", {"state": DaemonState.READY,
                                                         "methods": TTS_METHODS})
    assert h.tts.slots == [b"tts:100", b"tts:100"]


def test_dispatch_uses_no_more_slots_than_the_daemon_has():
    h = Harness(concurrency=3)
    h.register(slots=[b"tts:100:s0"])
    for rid in (1, 2):
        h.call(rid)
    assert h.take() == [("dispatch", "tts", 1)]


def test_unconnected_slot_requeues_the_call_at_the_front_and_retries_after_a_pause(ready):
    ready.effects.connected = False
    ready.call(1)
    ready.call(2)
    assert ready.take() == [("dispatch_failed", "tts", 1)]
    assert [r.id for r in ready.tts.queues[Priority.NORMAL]] == [1, 2]
    assert ready.tts.running == {}
    assert ready.scheduler.knows(ALICE, 1)
    assert ready.scheduler.next_wakeup() == pytest.approx(ready.clock() + DISPATCH_RETRY_S)
    ready.effects.connected = True
    ready.call(3)  # no dispatch before the pause is over, whatever the event
    ready.clock.advance(DISPATCH_RETRY_S / 2)
    ready.scheduler.on_tick()
    assert ready.take() == []
    ready.clock.advance(DISPATCH_RETRY_S / 2)
    ready.scheduler.on_daemon_seen("tts")
    ready.scheduler.on_tick()
    assert ready.take() == [("dispatch", "tts", 1)]
    assert ready.scheduler.next_wakeup() is None


def test_registration_clears_a_pending_dispatch_retry(ready):
    ready.effects.connected = False
    ready.call(1)
    ready.effects.connected = True
    ready.register(pid=200)
    assert ready.take() == [("dispatch_failed", "tts", 1), ("dispatch", "tts", 1)]


def test_loading_daemon_gets_no_calls_until_ready(h):
    h.register(state=DaemonState.LOADING)
    h.call(1)
    assert h.take() == []
    h.scheduler.on_daemon_state("tts", {"state": DaemonState.READY})
    assert h.take() == [("dispatch", "tts", 1)]


# --- cancellation --------------------------------------------------------------


def test_cancel_queued_replies_cancelled_and_never_dispatches(ready):
    ready.call(1)
    ready.call(2)
    ready.scheduler.on_cancel(ALICE, 2)
    assert ready.take() == [("dispatch", "tts", 1), ("reply_cancelled", 2)]
    assert not ready.scheduler.knows(ALICE, 2)
    ready.reply(1)
    assert ready.take() == []
    assert ready.tts.queued() == 0


def test_cancel_running_asks_daemon_and_waits_for_its_reply(ready):
    ready.call(1)
    ready.call(2)
    ready.take()
    ready.scheduler.on_cancel(ALICE, 1)
    assert ready.take() == [("cancel_remote", "tts", 1)]
    assert ready.scheduler.knows(ALICE, 1)  # not over until the daemon says so
    assert ready.reply(1) is True  # the daemon's `cancelled` reaches the client
    assert ready.take() == [("dispatch", "tts", 2)]


def test_cancel_of_unknown_or_answered_request_does_nothing(ready):
    ready.scheduler.on_cancel(ALICE, 99)
    ready.call(1, timeout=5)
    ready.clock.advance(5)
    ready.scheduler.on_daemon_seen("tts")
    ready.scheduler.on_tick()
    ready.take()
    ready.scheduler.on_cancel(ALICE, 1)  # timed out already: its terminal reply is sent
    assert ready.take() == []


# --- deadlines -----------------------------------------------------------------


def test_queued_request_times_out(h):
    h.call(1, timeout=5)
    assert h.scheduler.next_wakeup() == h.clock() + 5
    h.clock.advance(4.9)
    h.scheduler.on_tick()
    assert h.take() == []
    h.clock.advance(0.1)
    h.scheduler.on_tick()
    assert h.take() == [("reply_error", 1, "timeout")]
    assert "still queued" in h.effects.messages[1]
    assert h.tts.queued() == 0
    assert h.scheduler.next_wakeup() is None


def test_running_request_times_out_then_daemon_reply_is_dropped_and_slot_freed_only_then(ready):
    ready.call(1, timeout=5)
    ready.call(2)
    ready.take()
    ready.clock.advance(5)
    ready.scheduler.on_daemon_seen("tts")
    ready.scheduler.on_tick()
    assert ready.take() == [("reply_error", 1, "timeout"), ("cancel_remote", "tts", 1)]
    assert ready.tts.running[(ALICE, 1)].state is RequestState.ANSWERED
    assert not ready.scheduler.knows(ALICE, 1)
    assert ready.reply(1, terminal=False) is False  # a late chunk is dropped
    assert ready.take() == []  # ... and the slot is still taken
    assert ready.reply(1) is False  # the daemon's own terminal reply is dropped too
    assert ready.take() == [("dispatch", "tts", 2)]  # now the slot is free


def test_next_wakeup_skips_finished_requests(ready):
    ready.call(1, timeout=5)
    ready.call(2, timeout=9)
    ready.reply(1)
    assert ready.scheduler.next_wakeup() == ready.clock() + 9


# --- daemon lifecycle ----------------------------------------------------------


def test_daemon_lost_fails_running_with_daemon_crashed_but_keeps_queued(ready):
    ready.call(1)
    ready.call(2)
    ready.take()
    ready.scheduler.on_daemon_lost("tts", "the process exited")
    assert ready.take() == [("reply_error", 1, "daemon_crashed")]
    assert "the process exited" in ready.effects.messages[1]
    assert "send the request again" in ready.effects.messages[1]
    assert ready.tts.state == DaemonState.CRASHED
    assert ready.tts.running == {} and ready.tts.queued() == 1
    assert ready.scheduler.knows(ALICE, 2)


def test_daemon_lost_twice_is_reported_once(ready):
    ready.call(1)
    ready.take()
    ready.scheduler.on_daemon_lost("tts", "the process exited")
    ready.scheduler.on_daemon_lost("tts", "no heartbeat")
    assert ready.take() == [("reply_error", 1, "daemon_crashed")]
    assert ready.tts.error == "the process exited"


def test_queued_calls_dispatch_after_reregistration(ready):
    ready.call(1)
    ready.call(2)
    ready.scheduler.on_daemon_lost("tts", "the process exited")
    ready.call(3)
    ready.take()
    ready.register(pid=200)
    assert ready.take() == [("dispatch", "tts", 2)]
    assert ready.tts.pid == 200 and ready.tts.state == DaemonState.READY
    ready.reply(2)
    assert ready.take() == [("dispatch", "tts", 3)]


def test_registration_under_a_new_identity_fails_the_old_process_calls(ready):
    ready.call(1)
    ready.call(2)
    ready.take()
    ready.register(pid=200)
    assert ready.take() == [("reply_error", 1, "daemon_crashed"), ("dispatch", "tts", 2)]
    assert "replaced by a new process" in ready.effects.messages[1]


def test_reregistration_by_the_same_process_keeps_its_calls(ready):
    ready.call(1)
    ready.take()
    ready.register(running=[{"id": 1, "client": ALICE, "method": "speak", "slot": 0}])
    assert ready.take() == []
    assert ready.reply(1) is True


def test_failed_daemon_fails_queued_and_new_calls_with_its_error(h):
    h.register(state=DaemonState.LOADING)
    h.call(1)
    h.call(2, priority=Priority.INTERACTIVE)
    h.scheduler.on_daemon_state("tts", {"state": DaemonState.FAILED,
                                        "error": "load failed: CUDA out of memory"})
    assert sorted(h.take()) == [("reply_error", 1, "daemon_unavailable"),
                                ("reply_error", 2, "daemon_unavailable")]
    assert "CUDA out of memory" in h.effects.messages[1]
    h.call(3)
    assert h.take() == [("reply_error", 3, "daemon_unavailable")]
    assert "CUDA out of memory" in h.effects.messages[3]
    assert h.scheduler.requests == {}


def test_failed_daemon_reports_its_failure_not_unknown_method(h):
    # A daemon whose engine could not be created registers as failed, with no methods.
    h.register(state=DaemonState.FAILED, methods=[],
               error="cannot create engine pkg.mod:Engine: ImportError: no torch")
    h.call(1)
    assert h.take() == [("reply_error", 1, "daemon_unavailable")]
    assert "ImportError: no torch" in h.effects.messages[1]


def test_silent_daemon_declared_lost_after_expiry(ready):
    ready.call(1)
    ready.take()
    ready.clock.advance(3.0)
    ready.scheduler.on_tick()
    assert ready.take() == []  # silent for exactly the expiry: still alive
    ready.scheduler.on_daemon_seen("tts")  # a heartbeat
    ready.clock.advance(3.0)
    ready.scheduler.on_tick()
    assert ready.take() == []
    ready.clock.advance(0.1)
    ready.scheduler.on_tick()
    assert ready.take() == [("reply_error", 1, "daemon_crashed")]
    assert "no heartbeat for 3.1s" in ready.effects.messages[1]
    assert ready.tts.identity is None and ready.tts.state == DaemonState.CRASHED


def test_silent_client_queued_work_dropped_running_cancelled(ready):
    ready.call(1, client=ALICE)
    ready.call(2, client=ALICE)
    ready.call(3, client=BOB)
    ready.take()
    ready.clock.advance(10.5)
    ready.scheduler.on_client_seen(BOB)
    ready.scheduler.on_daemon_seen("tts")
    ready.scheduler.on_tick()
    # Nothing goes to Alice: only the daemon is told to stop her running call.
    assert ready.take() == [("cancel_remote", "tts", 1)]
    assert ALICE not in ready.scheduler.clients
    assert ready.tts.queued() == 1  # Bob's call is still waiting for the slot
    assert ready.reply(1, client=ALICE) is False
    assert ready.take() == [("dispatch", "tts", 3)]
    assert ready.scheduler.requests.keys() == {(BOB, 3)}


def test_reply_for_unknown_request_is_forwarded(h):
    # This broker restarted mid-call: the daemon's reply is the only copy of the answer.
    assert h.reply(9, terminal=False, name=None) is True
    assert h.reply(9, terminal=True, name=None) is True
    assert h.reply(9, terminal=True, name="tts") is True
    assert h.take() == []


def test_adopted_running_calls_after_register(h):
    h.call(1)  # queued while the broker waits for its daemon
    h.register(running=[{"id": 7, "client": BOB, "method": "clone", "slot": 0},
                        {"id": 8, "client": "not bytes", "method": "clone", "slot": 0}])
    assert h.take() == []  # the adopted call holds the only slot
    assert h.scheduler.knows(BOB, 7)
    assert (("not bytes", 8)) not in h.scheduler.requests
    adopted = h.tts.running[(BOB, 7)]
    assert adopted.state is RequestState.RUNNING and adopted.method == "clone"
    assert h.reply(7, client=BOB) is True
    assert h.take() == [("dispatch", "tts", 1)]


def test_supervisor_report_failed_start_fails_queued(h):
    h.call(1)
    h.call(2)
    h.scheduler.on_supervisor_report({
        "tts": {"status": "failed", "error": "ModuleNotFoundError: torch", "pid": 321},
        "not-configured": {"status": "failed"},
    })
    assert h.take() == [("reply_error", 1, "daemon_unavailable"),
                        ("reply_error", 2, "daemon_unavailable")]
    assert "failed to start: ModuleNotFoundError: torch" in h.effects.messages[1]
    assert h.tts.state == DaemonState.FAILED
    h.call(3)
    assert h.take() == [("reply_error", 3, "daemon_unavailable")]
    # The supervisor starts it again: calls wait for it once more.
    h.scheduler.on_supervisor_report({"tts": {"status": "running", "pid": 322}})
    assert h.tts.state == DaemonState.STARTING
    h.call(4)
    assert h.take() == []


def test_ready_pids_name_each_process_that_got_past_its_first_load(h):
    h.call(1)  # waiting work: the daemon is loaded as soon as it registers
    h.register(pid=100, state=DaemonState.UNLOADED, tier="unloaded")
    assert h.take() == [("set_tier", "tts", "resident")]
    assert h.scheduler.row("tts")["state"] == DaemonState.LOADING
    assert h.scheduler.row("tts")["ready_pids"] == []
    h.scheduler.on_daemon_state("tts", {"state": DaemonState.LOADING, "tier": "unloaded"})
    assert h.scheduler.row("tts")["ready_pids"] == []
    h.scheduler.on_daemon_state("tts", {"state": DaemonState.READY, "tier": "resident"})
    assert h.take() == [("dispatch", "tts", 1)]
    assert h.scheduler.row("tts")["ready_pids"] == [100]
    # Still known once the process is gone: what the supervisor asks about.
    h.scheduler.on_daemon_lost("tts", "the process exited")
    assert h.scheduler.row("tts")["ready_pids"] == [100]


def test_supervisor_report_failed_for_a_process_that_was_ready_is_a_crash(h):
    # The supervisor polls; a process ready only between two of its polls
    # and then killed looks to it like a failed start. The broker knows better.
    h.register(pid=100, state=DaemonState.LOADING)
    h.scheduler.on_daemon_state("tts", {"state": DaemonState.READY})
    h.call(1)
    h.call(2)
    h.scheduler.on_daemon_lost("tts", "the process exited")
    assert h.take() == [("dispatch", "tts", 1), ("reply_error", 1, "daemon_crashed")]
    h.scheduler.on_supervisor_report({"tts": {"status": "failed", "pid": None,
                                              "exited_pid": 100, "error": "killed by SIGKILL"}})
    assert h.take() == []  # call 2 waits for the restart
    assert h.tts.state == DaemonState.CRASHED
    # Its next process dies before it ever got ready: that is a failed start.
    h.scheduler.on_supervisor_report({"tts": {"status": "starting", "pid": 101}})
    h.scheduler.on_supervisor_report({"tts": {"status": "failed", "pid": None,
                                              "exited_pid": 101, "error": "exited with code 1"}})
    assert h.take() == [("reply_error", 2, "daemon_unavailable")]
    assert h.tts.state == DaemonState.FAILED


def test_supervisor_report_stopped_fails_queued(h):
    h.call(1)
    h.scheduler.on_supervisor_report({"tts": {"status": "stopped"}})
    assert h.take() == [("reply_error", 1, "daemon_unavailable")]
    assert h.tts.state == DaemonState.STOPPED
    h.call(2)
    assert h.take() == [("reply_error", 2, "daemon_unavailable")]


def test_supervisor_report_does_not_override_a_registered_daemon(ready):
    ready.scheduler.on_supervisor_report({"tts": {"status": "failed", "error": "stale"}})
    assert ready.tts.state == DaemonState.READY
    assert ready.tts.process == {"status": "failed", "error": "stale"}


def test_a_state_only_the_broker_gives_is_refused_from_a_daemon_report(ready):
    # crashed, stopped and starting describe the process, which the daemon cannot see.
    for state in (DaemonState.CRASHED, DaemonState.STOPPED, DaemonState.STARTING):
        with pytest.raises(IllegalTransition, match="from ready to " + state):
            ready.scheduler.on_daemon_state("tts", {"state": state})
        assert ready.tts.state == DaemonState.READY
    assert ready.take() == []


def test_a_registration_with_a_state_no_engine_is_in_takes_nothing_of_it(h):
    with pytest.raises(IllegalTransition):
        h.register(state=DaemonState.CRASHED)
    assert h.tts.identity is None and h.tts.state == DaemonState.STARTING
    h.register()
    assert h.tts.serving


def test_the_supervisor_starts_only_a_daemon_without_a_process():
    class Daemon:
        name, state = "tts", DaemonState.READY

    with pytest.raises(IllegalTransition):
        transition(Daemon, DaemonState.STARTING, Cause.SUPERVISOR)
    Daemon.state = DaemonState.CRASHED
    transition(Daemon, DaemonState.STARTING, Cause.SUPERVISOR)
    assert Daemon.state == DaemonState.STARTING


# --- what the broker learns of the scheduler -------------------------------------


def test_a_forwarded_terminal_reply_says_what_ended(ready):
    ready.clock.advance(1.0)
    ready.call(1)
    ready.clock.advance(2.0)
    assert ready.scheduler.on_reply("tts", ALICE, 1, terminal=False) == (Route.FORWARD, None)
    route, request = ready.scheduler.on_reply("tts", ALICE, 1, terminal=True)
    assert route is Route.FORWARD and request.id == 1
    assert (request.ended.daemon, request.ended.method) == ("tts", "speak")
    assert (request.ended.queue_s, request.ended.run_s) == (0.0, 2.0)


def test_a_reply_for_a_call_this_broker_does_not_know_is_unclaimed(h):
    assert h.scheduler.on_reply("tts", ALICE, 9, terminal=True) == (Route.UNCLAIMED, None)


def test_each_terminal_reply_of_the_scheduler_says_what_ended(h):
    unknown = h.call(1, model="nope")
    h.register()
    no_such_method = h.call(2, method="sing")  # the daemon has no such method
    assert [effect[0] for effect in h.take()] == ["reply_error", "reply_error"]
    assert (unknown.ended.daemon, unknown.ended.method, unknown.ended.run_s) == (
        None, None, None)
    assert (no_such_method.ended.daemon, no_such_method.ended.method) == ("tts", None)


def test_a_second_socket_may_not_take_the_name_of_a_live_daemon(ready):
    refusal = ready.scheduler.refuse_registration("tts", b"stranger", None)
    assert refusal.code == "bad_message" and "registered by pid 100" in refusal.message
    assert ready.scheduler.refuse_registration("tts", b"stranger", False) is not None
    assert ready.scheduler.refuse_registration("tts", b"tts:100:control", None) is None
    assert ready.scheduler.refuse_registration("tts", b"stranger", True) is None  # it exited
    ready.clock.advance(3.5)  # silent for longer than the daemon expiry
    assert ready.scheduler.refuse_registration("tts", b"stranger", None) is None


def test_pinning_a_model_that_is_not_configured_is_refused(h):
    with pytest.raises(UnknownModel, match="this broker serves: tts"):
        h.scheduler.set_pinned("nope", True)
    assert h.scheduler.set_pinned("tts", True)["pinned"] is True


def test_a_malformed_reply_from_the_calls_slot_ends_it_with_an_internal_error(ready):
    ready.call(1)
    ready.take()
    ready.scheduler.on_malformed_reply(b"stranger", ALICE, 1)
    assert ready.take() == [] and ready.scheduler.knows(ALICE, 1)
    ready.scheduler.on_malformed_reply(b"tts:100:s0", ALICE, 1)
    assert ready.take() == [("reply_error", 1, "internal")]
    assert not ready.scheduler.knows(ALICE, 1)


# --- snapshot ------------------------------------------------------------------


def test_snapshot_of_a_registered_daemon_shows_busy_and_uptime_from_the_clock(h):
    h.register(uptime_s=30.0, interpreter="CPython 3.8.18", python="3.8.18",
               engine="pkg.mod:Engine", loads=1, facts={"device": "cuda:0"})
    h.clock.advance(5)
    (row,) = h.scheduler.snapshot()
    assert row["state"] == DaemonState.READY
    assert row["uptime_s"] == pytest.approx(35.0)
    assert row["pid"] == 100
    assert row["methods"] == TTS_METHODS
    assert (row["interpreter"], row["python"], row["engine"]) == (
        "CPython 3.8.18", "3.8.18", "pkg.mod:Engine")
    assert (row["loads"], row["facts"]) == (1, {"device": "cuda:0"})
    h.call(1)
    h.call(2)
    (row,) = h.scheduler.snapshot()
    assert row["state"] == DaemonState.BUSY
    assert (row["running"], row["queued"], row["concurrency"], row["max_queue"]) == (1, 1, 1, 64)


def test_snapshot_of_a_lost_daemon_uses_the_supervisor_facts(ready):
    ready.scheduler.on_daemon_lost("tts", "the process exited")
    ready.scheduler.on_supervisor_report({"tts": {"status": "backoff", "pid": 555,
                                                  "restarts": 2}})
    (row,) = ready.scheduler.snapshot()
    assert row["state"] == DaemonState.CRASHED
    assert (row["pid"], row["restarts"], row["uptime_s"]) == (555, 2, None)
    assert row["last_error"] == "the process exited"


# --- regressions: bugs these tests found -------------------------------------


def test_deadline_of_a_finished_request_does_not_expire_a_later_one_with_its_id(ready):
    ready.call(1, timeout=10)
    ready.reply(1)  # done well within its timeout
    ready.clock.advance(5)
    ready.call(1, timeout=100)  # accepted: the id is no longer in use
    ready.take()
    ready.clock.advance(5)  # the first call's deadline, not the second's
    ready.scheduler.on_daemon_seen("tts")
    ready.scheduler.on_tick()
    assert ready.take() == []


def test_daemon_declared_lost_but_alive_cannot_send_a_second_terminal(ready):
    ready.call(1)
    ready.clock.advance(3.5)
    ready.scheduler.on_tick()
    assert ready.take() == [("dispatch", "tts", 1), ("reply_error", 1, "daemon_crashed")]
    # The daemon was alive after all: the broker hears from an unregistered identity.
    assert ready.reply(1, name=None) is False


def test_adopted_call_without_a_slot_still_counts_against_concurrency(h):
    h.call(1)
    h.register(running=[{"id": 7, "client": BOB, "method": "clone"}])
    assert h.take() == []
    assert len(h.tts.running) <= h.tts.config.concurrency


# --- property: random event sequences against two daemons ----------------------

PROPERTY_CONFIG = make_config({"a": dict(concurrency=1, max_queue=3),
                               "b": dict(concurrency=2, max_queue=4)},
                              # A client silent for 2 s is gone: shorter than most
                              # timeouts, so silence alone drops work.
                              client_liveness_s=2.0, heartbeat_s=1.0, liveness=3)
PROPERTY_DAEMONS = sorted(PROPERTY_CONFIG.daemons)
PROPERTY_CLIENTS = [b"c0", b"c1", b"c2"]
CLIENT_EXPIRY_S = PROPERTY_CONFIG.broker.client_liveness_s
DAEMON_EXPIRY_S = PROPERTY_CONFIG.broker.daemon_expiry_s


class FakeProcess:
    """A daemon process as the test imagines it: its sockets and the calls it works on."""

    def __init__(self, name, pid, connected):
        self.pid = pid
        self.identity = "{}:{}:control".format(name, pid).encode()
        self.slots = ["{}:{}:s{}".format(name, pid, i).encode()
                      for i in range(PROPERTY_CONFIG.daemons[name].concurrency)]
        self.connected = connected  # False: its slot sockets have not connected yet
        self.in_flight = {}  # request id -> slot index, in dispatch order


class World:
    """The scheduler plus the daemons and clients around it, and what each request got."""

    def __init__(self):
        self.clock = FakeClock()
        self.scheduler = Scheduler(PROPERTY_CONFIG, self, self.clock)
        self.processes = {name: None for name in PROPERTY_DAEMONS}  # None: no live process
        self.next_pid = 100
        self.next_id = 0
        self.client_of = {}  # request id -> client (ids are unique across clients)
        self.terminals = collections.Counter()  # request id -> terminal replies the client got
        self.dispatches = collections.Counter()  # successful dispatches only
        self.abandoned = set()  # ids whose client went away before they were answered
        for index in range(len(PROPERTY_DAEMONS)):
            self.register(index, same_process=False, state=DaemonState.READY, connected=True)

    # Effects ------------------------------------------------------------------

    def dispatch(self, daemon, request):
        process = self.processes[daemon.name]
        assert process is not None and process.identity == daemon.identity, \
            "dispatched to a daemon without a live process"
        assert self.terminals[request.id] == 0, "dispatched after its terminal reply"
        assert 0 <= request.slot < len(process.slots), "dispatched to a slot it does not have"
        assert daemon.slots[request.slot] == process.slots[request.slot]
        assert request.slot not in process.in_flight.values(), "two calls in one slot"
        if not process.connected:
            return False
        self.dispatches[request.id] += 1
        assert self.dispatches[request.id] == 1, "dispatched twice"
        process.in_flight[request.id] = request.slot
        return True

    def cancel_remote(self, daemon, request):
        assert self.processes[daemon.name] is not None

    def reply_error(self, request, error):
        self._terminal(request)

    def reply_cancelled(self, request, message):
        self._terminal(request)

    def event(self, kind, daemon, **fields):
        assert kind in ("move", "moved", "error"), kind

    def _terminal(self, request):
        # Every client here says hello before each call, so one missing from
        # `clients` went away, and nothing may be sent to it any more.
        assert request.client in self.scheduler.clients, "a reply to a client that went away"
        self.terminals[request.id] += 1

    # Events -------------------------------------------------------------------

    def call(self, client_index, daemon_index, method, priority, timeout):
        client = PROPERTY_CLIENTS[client_index]
        self.next_id += 1
        rid = self.next_id
        self.client_of[rid] = client
        self.scheduler.on_client_seen(client)
        self.scheduler.on_call(Request(
            client=client, id=rid, model=PROPERTY_DAEMONS[daemon_index], method=method,
            forward={}, payloads=[], priority=priority,
            deadline=None if timeout is None else self.clock() + timeout))

    def cancel(self, pick):
        if self.client_of:
            rid = sorted(self.client_of)[pick % len(self.client_of)]
            self.scheduler.on_cancel(self.client_of[rid], rid)

    def daemon_reply(self, daemon_index, pick, terminal):
        name = PROPERTY_DAEMONS[daemon_index]
        process = self.processes[name]
        if process is None or not process.in_flight:
            return
        rid = list(process.in_flight)[pick % len(process.in_flight)]
        if terminal:
            del process.in_flight[rid]  # its slot is free once the daemon has sent this
        forwarded = self.scheduler.on_reply(name, self.client_of[rid], rid,
                                            terminal).route is not Route.DROP
        if terminal and forwarded:
            self.terminals[rid] += 1
        elif forwarded:
            assert self.terminals[rid] == 0, "a chunk forwarded after the terminal reply"

    def daemon_lost(self, daemon_index):
        name = PROPERTY_DAEMONS[daemon_index]
        self.scheduler.on_daemon_lost(name, "the process exited")
        self.processes[name] = None  # dead: it answers nothing more

    def register(self, daemon_index, same_process, state, connected):
        name = PROPERTY_DAEMONS[daemon_index]
        process = self.processes[name]
        if not same_process or process is None:
            # A new process; an old one still registered is replaced (it is gone).
            self.next_pid += 1
            process = FakeProcess(name, self.next_pid, connected)
            self.processes[name] = process
        running = [{"id": rid, "client": self.client_of[rid], "method": "run", "slot": slot}
                   for rid, slot in process.in_flight.items()]
        self.scheduler.on_daemon_registered(name, process.identity, {
            "pid": process.pid, "methods": ["run"], "state": state, "slots": process.slots,
            "running": running})

    def slots_connect(self, daemon_index):
        process = self.processes[PROPERTY_DAEMONS[daemon_index]]
        if process is not None:
            process.connected = True

    def daemon_state(self, daemon_index, state):
        name = PROPERTY_DAEMONS[daemon_index]
        process = self.processes[name]
        if process is None or (state == DaemonState.FAILED and process.in_flight):
            return  # only a live process reports; a load fails before any call runs
        update = {"state": state}
        if state == DaemonState.FAILED:
            update["error"] = "load failed"
        self.scheduler.on_daemon_state(name, update)

    def supervisor_report(self, daemon_index, status):
        self.scheduler.on_supervisor_report({PROPERTY_DAEMONS[daemon_index]: {"status": status}})

    def tick(self, seconds, heartbeats):
        self.clock.advance(seconds)
        if heartbeats:
            self._heartbeats()
        self._tick()

    def client_gone(self, client_index):
        """Only this client falls silent; everyone else keeps talking."""
        gone = PROPERTY_CLIENTS[client_index]
        self.clock.advance(CLIENT_EXPIRY_S + 0.5)
        self._heartbeats(silent=gone)
        self._tick()

    def _heartbeats(self, silent=None):
        for name, process in self.processes.items():
            if process is not None:
                self.scheduler.on_daemon_seen(name)
        for client in list(self.scheduler.clients):
            if client != silent:
                self.scheduler.on_client_seen(client)

    def _tick(self):
        clients_before = set(self.scheduler.clients)
        self.scheduler.on_tick()
        for client in clients_before - set(self.scheduler.clients):
            self.abandoned.update(rid for rid, owner in self.client_of.items()
                                  if owner == client and self.terminals[rid] == 0)
        for name, daemon in self.scheduler.daemons.items():
            if daemon.identity is None:
                self.processes[name] = None  # declared lost: the test kills it

    def finish(self):
        """Bring every daemon up, connected and ready, and let each answer all its calls."""
        for index, name in enumerate(PROPERTY_DAEMONS):
            process = self.processes[name]
            if process is None:
                self.register(index, same_process=False, state=DaemonState.READY,
                              connected=True)
            else:
                process.connected = True
                if self.scheduler.daemons[name].state != DaemonState.READY:
                    self.scheduler.on_daemon_state(name, {"state": DaemonState.READY})
            self.check_invariants()
        for _ in range(1000):
            if not (any(p.in_flight for p in self.processes.values())
                    or any(d.queued() for d in self.scheduler.daemons.values())):
                return
            # Past any dispatch retry pause; everyone keeps talking.
            self.tick(DISPATCH_RETRY_S, heartbeats=True)
            self.check_invariants()
            for index, name in enumerate(PROPERTY_DAEMONS):
                while self.processes[name].in_flight:
                    self.daemon_reply(index, 0, terminal=True)
                    self.check_invariants()
        raise AssertionError("calls still queued or running after 1000 rounds")

    # Invariants ---------------------------------------------------------------

    def check_invariants(self):
        for rid, count in self.terminals.items():
            assert count <= 1, "request {} got {} terminal replies".format(rid, count)
        for rid in self.abandoned:
            assert self.terminals[rid] == 0, "a reply went to a client that went away"
        for rid, client in self.client_of.items():
            request = self.scheduler.requests.get((client, rid))
            live = request is not None and request.state is not RequestState.ANSWERED
            if self.terminals[rid] == 0 and rid not in self.abandoned:
                assert live, "request {} was dropped without a reply".format(rid)
            elif self.terminals[rid] == 1:
                assert not live, "request {} is still live after its terminal reply".format(rid)
        for name, daemon in self.scheduler.daemons.items():
            assert len(daemon.running) <= daemon.config.concurrency
            assert daemon.queued() <= daemon.config.max_queue


daemon_index = st.integers(0, len(PROPERTY_DAEMONS) - 1)
calls = st.tuples(st.just("call"), st.integers(0, len(PROPERTY_CLIENTS) - 1), daemon_index,
                  st.sampled_from(["run", "run", "run", "nope"]), st.sampled_from(Priority.ALL),
                  st.one_of(st.none(), st.floats(0.5, 8.0)))
events = st.one_of(
    calls,
    calls,  # twice as likely as any other event: queues need filling
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("daemon_reply"), daemon_index, st.integers(0, 1000), st.booleans()),
    st.tuples(st.just("daemon_lost"), daemon_index),
    st.tuples(st.just("register"), daemon_index, st.booleans(),
              st.sampled_from([DaemonState.READY, DaemonState.READY, DaemonState.LOADING]),
              st.booleans()),
    st.tuples(st.just("slots_connect"), daemon_index),
    st.tuples(st.just("daemon_state"), daemon_index,
              st.sampled_from([DaemonState.READY, DaemonState.FAILED])),
    st.tuples(st.just("supervisor_report"), daemon_index,
              st.sampled_from(["failed", "stopped", "backoff", "running"])),
    st.tuples(st.just("tick"), st.sampled_from([0.0, DISPATCH_RETRY_S, 1.0, 2.5, 3.5, 6.0]),
              st.sampled_from([True, True, False])),
    st.tuples(st.just("client_gone"), st.integers(0, len(PROPERTY_CLIENTS) - 1)),
)


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=10, max_size=80))
def test_random_event_sequences_keep_the_scheduler_contracts(sequence):
    world = World()
    for event in sequence:
        getattr(world, event[0])(*event[1:])
        world.check_invariants()
    world.finish()
    world.check_invariants()
    for rid in world.client_of:
        if rid not in world.abandoned:
            assert world.terminals[rid] == 1, "request {} got no terminal reply".format(rid)
    assert world.scheduler.requests == {}
    assert all(d.queued() == 0 and not d.running for d in world.scheduler.daemons.values())
