"""The broker's scheduler, its event core: requests, daemon reports, crashes, time.

Pure and synchronous: events come in through `on_*` methods, side effects go
out through an `Effects` object, time comes from an injected clock and memory
from readings handed to `on_memory`. It opens no socket and never sleeps, so
tests drive it decision by decision. After each event the pump (pump.py)
starts what can start. The rest of the scheduler:
- scheduler_types.py: `Request`, `Daemon`, the `Effects` interface;
- transitions.py: the daemon states and the tier-to-state tables;
- admission.py: what a request needs, whether it can ever fit, victim ranking;
- tier_moves.py: ordering tier moves, and learning footprints from them;
- daemon_rows.py: each daemon's row in `ps`.

Memory (see broker/DESIGN.md): every daemon holds its footprint at its tier
on one device. A call starts only when its daemon is resident and the
call's peak fits under the device's threshold, counting every daemon's
footprint (or what the probe measures of it, whichever is larger), every
running call's peak, and memory held by other processes where configured.
When it does not fit, the first waiting call on that device moves idle
daemons down the tiers (placement.py), and waits for the probe to confirm.

Contracts:
- every request accepted by `on_call` ends with exactly one terminal effect
  (`reply_error`, `reply_cancelled`, or a forwarded terminal reply from the
  daemon), unless its client went away, in which case nothing is sent.
- a request answered early (timeout, cancel) while running keeps its
  concurrency slot until the daemon itself says the call is over, and
  whatever the daemon sends for it afterwards is dropped.
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from typing import Any, Callable

from modelhost.errors import (
    BadArguments, BadMessage, DaemonCrashed, DaemonUnavailable, ModelhostError, OverCapacity,
    PayloadTooLarge, Timeout, UnknownMethod, UnknownModel,
)
from modelhost.protocol import DaemonState, Tier

from .accounting import MemoryBook
from .admission import never_fits
from .config import Config
from .daemon_rows import daemon_row, shown_state
from .events import LOAD_FAILED, START_FAILED
from .footprints import Footprint
from .memory import MemoryReading
from .pump import Pump
from .scheduler_types import Action, Daemon, Effects, Request, RequestKey, RequestState
from .tier_moves import TierMoves, ttl_expiry
from .transitions import STATE_OF_TIER, TRANSITIONAL, Cause, check, transition

log = logging.getLogger("modelhost.broker")

# While a call waits for memory, the queue is looked at again this often:
# aging and the priority window change what may be evicted, with no event.
WAIT_RECHECK_S = 0.25
# How many calls answered `daemon_crashed` are remembered, to drop late replies.
ABANDONED_REMEMBERED = 4096


class Scheduler:
    def __init__(self, config: Config, effects: Effects, clock: Callable[[], float], *,
                 footprints: dict[str, Footprint] | None = None,
                 pins: dict[str, bool] | None = None):
        broker = config.broker
        self.daemons = {
            name: Daemon(name, daemon, daemon.max_payload_bytes or broker.max_payload_bytes)
            for name, daemon in config.daemons.items()}
        for name, daemon in self.daemons.items():
            if footprints is not None and name in footprints:
                daemon.footprint = footprints[name]
            daemon.footprint.declared_resident = daemon.config.declared_resident
            daemon.footprint.declared_peak = daemon.config.declared_peak
            daemon.pinned = (pins or {}).get(name, daemon.config.pin)
        self.effects = effects
        self.clock = clock
        self.daemon_expiry_s = broker.daemon_expiry_s
        self.client_expiry_s = broker.client_liveness_s
        self.book = MemoryBook(self.daemons, broker.memory.limit_for)
        self.requests: dict[RequestKey, Request] = {}
        self.moves = TierMoves(self.book, effects, clock, self.daemon_expiry_s)
        self.pump = Pump(self.daemons, self.requests, self.book, broker.memory, effects,
                         self.moves, clock, self.row)
        # client identity -> last time it said anything; a silent client's
        # queued work is dropped so nobody computes for a dead process.
        self.clients: dict[bytes, float] = {}
        # (deadline, tie-breaker, request): the request itself, so a deadline
        # can never hit a later request that reuses a finished one's id.
        self._deadlines: list[tuple[float, int, Request]] = []
        # Calls answered `daemon_crashed` whose daemon may only have been
        # silent: a late word from it must not become a second terminal reply.
        self._abandoned: OrderedDict[RequestKey, None] = OrderedDict()
        self._deadline_seq = 0
        self._arrivals = 0
        self._pins_changed = False  # the broker saves them

    # --- client events -------------------------------------------------------

    def on_client_seen(self, client: bytes) -> None:
        self.clients[client] = self.clock()

    def on_call(self, request: Request) -> None:
        daemon = self.daemons.get(request.model)
        if request.key in self.requests:
            self.effects.reply_error(request, BadMessage(
                "request id {!r} is already in use by this client; use a new id per request"
                .format(request.id)))
            return
        if daemon is None:
            self.effects.reply_error(request, UnknownModel(
                "no model named {!r}; this broker serves: {}".format(
                    request.model, ", ".join(self.daemons) or "none")))
            return
        is_call = request.action == Action.CALL
        # A failed daemon still takes a load (it retries); a stopped one that
        # the memory manager did not stop has nobody to start it.
        unavailable = (DaemonState.FAILED, DaemonState.STOPPED) if is_call else \
            (DaemonState.STOPPED,) if request.action == Action.LOAD else ()
        if daemon.identity is None and daemon.process.get("final"):
            unavailable = (DaemonState.FAILED,) + unavailable  # no process will ever come
        if daemon.state in unavailable and not daemon.want_stopped:
            self.effects.reply_error(request, DaemonUnavailable("daemon {} is {}: {}".format(
                daemon.name, daemon.state, daemon.error or "see `modelhost ps`")))
            return
        if is_call and daemon.methods is not None and request.method not in daemon.methods:
            self.effects.reply_error(request, UnknownMethod(
                "{} has no method {!r}; it offers: {}".format(
                    daemon.name, request.method, ", ".join(daemon.methods))))
            return
        if request.payload_bytes > daemon.max_payload_bytes:
            self.effects.reply_error(request, PayloadTooLarge(
                "the request carries {} bytes of payload; {} accepts at most {} (max_payload "
                "in its config)".format(request.payload_bytes, daemon.name,
                                        daemon.max_payload_bytes)))
            return
        if daemon.queued() >= daemon.config.max_queue:
            self.effects.reply_error(request, OverCapacity(
                "{} already has {} calls queued (max_queue); retry later or raise max_queue"
                .format(daemon.name, daemon.queued())))
            return
        if request.action == Action.UNLOAD and daemon.pinned:
            self.effects.reply_error(request, BadArguments(
                "{} is pinned, so it stays loaded; unpin it first (modelhost unpin {})".format(
                    daemon.name, daemon.name)))
            return
        # A call that can start right away fits; one that will wait learns
        # now, not at the head of the queue, that it never could.
        starts_now = (daemon.serving and daemon.target is None and not daemon.queued()
                      and len(daemon.running) < daemon.config.concurrency)
        if request.action != Action.UNLOAD and not starts_now:
            never = never_fits(self.book, daemon, request)
            if never is not None:
                self.effects.reply_error(request, never)
                return
        request.enqueued_at = self.clock()
        self._arrivals += 1
        request.seq = self._arrivals
        request.state = RequestState.QUEUED
        self.requests[request.key] = request
        if request.action == Action.UNLOAD:
            daemon.unload_waiters.append(request)
        else:
            daemon.queues[request.priority].append(request)
        if request.deadline is not None:
            self._deadline_seq += 1
            heapq.heappush(self._deadlines, (request.deadline, self._deadline_seq, request))
        self.pump.run()

    def on_cancel(self, client: bytes, request_id: Any) -> None:
        request = self.requests.get((client, request_id))
        if request is None or request.state is RequestState.ANSWERED:
            return  # already over: its terminal reply is sent or on its way
        daemon = self.daemons[request.model]
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.effects.reply_cancelled(request, "cancelled before it started")
            self.pump.run()
        else:
            # The daemon stops cooperatively and answers `cancelled` itself.
            self.effects.cancel_remote(daemon, request)

    def request_from(self, sender: bytes, client: bytes, request_id: Any) -> Request | None:
        """The running request `sender` may answer for, or None."""
        request = self.requests.get((client, request_id))
        if request is None or request.sender not in (None, sender):
            return None
        return request

    def knows(self, client: bytes, request_id: Any) -> bool:
        request = self.requests.get((client, request_id))
        return request is not None and request.state is not RequestState.ANSWERED

    def set_pinned(self, name: str, pinned: bool) -> Daemon:
        daemon = self.daemons[name]
        if daemon.pinned != pinned:
            daemon.pinned = pinned
            self._pins_changed = True
            log.info("daemon=%s %s", name, "pinned: never evicted" if pinned else "unpinned")
            self.pump.run()
        return daemon

    # --- daemon events -------------------------------------------------------

    def on_daemon_registered(self, name: str, identity: bytes, info: dict) -> Daemon | None:
        daemon = self.daemons.get(name)
        if daemon is None:
            return None
        if info.get("state"):
            check(daemon, info["state"], Cause.REPORT)  # before anything of it is taken
        if daemon.identity not in (None, identity):
            # The same name under a new connection: the old process is gone.
            self._fail_running(daemon, "daemon {} was replaced by a new process".format(name))
        now = self.clock()
        if daemon.identity != identity:
            daemon.preload_tried = False  # a new process, or a restarted broker
            self.pump.preload_due = True
        daemon.identity = identity
        daemon.last_seen = now
        daemon.pid = info.get("pid")
        daemon.interpreter = info.get("interpreter")
        daemon.python = info.get("python")
        daemon.engine = info.get("engine")
        daemon.methods = list(info.get("methods") or [])
        daemon.slots = list(info.get("slots") or [identity] * daemon.config.concurrency)
        daemon.retry_at = 0.0
        daemon.started_at = now - float(info.get("uptime_s") or 0.0)
        daemon.want_stopped = False
        daemon.tiers = tuple(info.get("tiers") or (Tier.RESIDENT, Tier.UNLOADED))
        if not daemon.last_used:
            daemon.last_used = now
        tier = info.get("tier")
        if tier not in Tier.ALL:
            # A runtime that does not speak of tiers is loaded when ready.
            tier = Tier.RESIDENT if info.get("state") in (DaemonState.READY,
                                                         DaemonState.BUSY) else Tier.UNLOADED
        daemon.tier = tier
        target = daemon.target
        daemon.target = None
        self._apply_state(daemon, info)
        for call in info.get("running") or []:
            self._adopt(daemon, call)
        if target == Tier.RESIDENT and daemon.tier != Tier.RESIDENT:
            # Started to serve a waiting request: its room is still reserved.
            self.moves.move(daemon, Tier.RESIDENT, "started for a waiting request", "request")
        self.pump.run()
        self._note_ready(daemon)
        return daemon

    def on_daemon_state(self, name: str, update: dict) -> None:
        daemon = self.daemons[name]
        daemon.last_seen = self.clock()
        self._apply_state(daemon, update)
        tier = update.get("tier")
        if tier not in Tier.ALL:
            # A runtime that does not name its tier: its state says it.
            tier = next((t for t, s in STATE_OF_TIER.items() if s == daemon.state), daemon.tier)
        daemon.tier = tier
        if daemon.state not in TRANSITIONAL and daemon.target is not None:
            self.moves.arrived(daemon, daemon.target, update)
            if daemon.tier == Tier.UNLOADED or daemon.state == DaemonState.FAILED:
                self.pump.answer_unload_waiters(daemon)
        if daemon.state == DaemonState.FAILED:
            self.effects.event("error", name, level="error", rid=None, code=LOAD_FAILED,
                               message=str(daemon.error))
            self._fail_queued(daemon, DaemonUnavailable("daemon {} failed: {}".format(
                name, daemon.error)))
        self.pump.run()
        self._note_ready(daemon)

    def on_daemon_seen(self, name: str, mem: dict | None = None) -> None:
        daemon = self.daemons[name]
        daemon.last_seen = self.clock()
        if mem is not None:
            daemon.mem = mem

    def on_reply(self, name: str | None, client: bytes, request_id: Any,
                 terminal: bool, mem: dict | None = None, sender: bytes | None = None) -> bool:
        """A daemon's reply for a call; True when it should be forwarded to the client.

        `sender` is the socket it came from: a reply for a call from any socket
        but the slot the call was dispatched to is refused.
        """
        request = self.requests.get((client, request_id))
        if request is not None and sender is not None and request.sender is not None \
                and sender != request.sender:
            log.warning("daemon=%s rid=%s refused a reply from %r: the call runs on %r",
                        request.model, request_id, sender, request.sender)
            return False
        if request is None:
            if (client, request_id) in self._abandoned:
                return False  # its caller already has `daemon_crashed`
            # Unknown here (this broker restarted mid-call): the daemon's word
            # is the only copy of the answer, so pass it on.
            return True
        forward = request.state is RequestState.RUNNING
        if terminal:
            daemon = self.daemons.get(request.model)
            if daemon is not None and request.key in daemon.running:
                self.moves.call_ended(daemon, request, mem)
            self._finish(request)
            self.pump.run()
        return forward

    def on_daemon_lost(self, name: str, reason: str) -> None:
        """The daemon's process died or fell silent: fail its calls, wait for its restart."""
        daemon = self.daemons[name]
        if daemon.identity is None:
            return
        daemon.identity = None
        daemon.started_at = None
        daemon.tier = Tier.STOPPED
        if daemon.target == Tier.STOPPED:
            # The stop the memory manager asked for: the memory is back.
            log.info("daemon=%s stopped to free memory", name)
            daemon.target = None
            daemon.moves[Tier.STOPPED] = daemon.moves.get(Tier.STOPPED, 0) + 1
            self.effects.event("moved", name, tier=Tier.STOPPED, took_s=None, failed=False,
                               memory_bytes=None)
            transition(daemon, DaemonState.STOPPED, Cause.STOPPED)
            daemon.error = None
            self._fail_running(daemon, "daemon {} was stopped".format(name))
            self.pump.answer_unload_waiters(daemon)
            self.pump.run()
            return
        log.warning("daemon=%s lost: %s", name, reason)
        self.effects.event("error", name, level="error", rid=None, code=DaemonCrashed.code,
                           message="lost: " + reason)
        daemon.target = None
        transition(daemon, DaemonState.CRASHED, Cause.LOST)
        daemon.error = reason
        self._fail_running(daemon, "daemon {} (pid {}) died during the call: {}; it is being "
                           "restarted, send the request again".format(name, daemon.pid, reason))
        self._fail_unload_waiters(daemon, reason)
        self.pump.run()

    def on_supervisor_report(self, processes: dict) -> None:
        """Process facts from `modelhost up`: restarts, start failures, stderr tails."""
        self.moves.supervisor_seen = self.clock()
        for name, process in processes.items():
            daemon = self.daemons.get(name)
            if daemon is None:
                continue
            daemon.process = process
            if daemon.identity is not None:
                continue
            status = process.get("status")
            if status == "failed" and process.get("exited_pid") in daemon.ready_pids:
                # That process was ready, then died: a crash, which the
                # supervisor restarts; queued calls wait for it.
                status = "backoff"
            if daemon.want_stopped:
                if status == "stopped":
                    transition(daemon, DaemonState.STOPPED, Cause.STOPPED)
                continue
            if status == "failed":
                if daemon.state != DaemonState.FAILED:
                    self.effects.event("error", name, level="error", rid=None,
                                       code=START_FAILED, message=str(process.get("error")))
                transition(daemon, DaemonState.FAILED, Cause.SUPERVISOR)
                daemon.error = process.get("error")
                self._fail_queued(daemon, DaemonUnavailable(
                    "daemon {} failed to start: {}".format(name, daemon.error)))
            elif status == "stopped" and daemon.target != Tier.RESIDENT:
                transition(daemon, DaemonState.STOPPED, Cause.SUPERVISOR)
                self._fail_queued(daemon, DaemonUnavailable("daemon {} is stopped".format(name)))
            elif status == "backoff":
                transition(daemon, DaemonState.CRASHED, Cause.SUPERVISOR)
            elif status in ("running", "starting", "pending") and daemon.state in (
                    DaemonState.STOPPED, DaemonState.FAILED, DaemonState.CRASHED):
                transition(daemon, DaemonState.STARTING, Cause.SUPERVISOR)

    def on_memory(self, reading: MemoryReading) -> None:
        """A fresh probe reading: peaks of running calls, idle footprints, then admission."""
        self.book.update(reading)
        for daemon in self.daemons.values():
            measured = self.book.measured(daemon)
            if measured is None:
                continue
            for request in daemon.running.values():
                request.peak_seen = max(request.peak_seen, measured)
            if daemon.tier == Tier.RESIDENT and daemon.state == DaemonState.READY \
                    and not daemon.running and daemon.target is None:
                self.moves.remember(daemon, Tier.RESIDENT, measured)
        self.pump.run()

    # --- time ---------------------------------------------------------------

    def next_wakeup(self) -> float | None:
        while self._deadlines and self._stale_deadline(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        times = [d.retry_at for d in self.daemons.values() if d.retry_at]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self.pump.waiting:
            times.append(self.clock() + WAIT_RECHECK_S)
        for daemon in self.daemons.values():
            expiry = ttl_expiry(daemon)
            if expiry is not None:
                times.append(expiry)
        return min(times, default=None)

    def on_tick(self) -> None:
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            entry = heapq.heappop(self._deadlines)
            if not self._stale_deadline(entry):
                self._expire(entry[2])
        for daemon in self.daemons.values():
            if daemon.identity is not None and now - daemon.last_seen > self.daemon_expiry_s:
                self.on_daemon_lost(daemon.name, "no heartbeat for {:.1f}s".format(
                    now - daemon.last_seen))
            elif daemon.retry_at and now >= daemon.retry_at:
                daemon.retry_at = 0.0
            expiry = ttl_expiry(daemon)
            if expiry is not None and now >= expiry:
                self.moves.move(daemon, Tier.UNLOADED, "idle for {:.0f}s (idle_ttl_s)".format(
                    now - daemon.last_used), "idle_ttl")
        for client, seen in list(self.clients.items()):
            if now - seen > self.client_expiry_s:
                self._drop_client(client)
        self.pump.run()

    def take_dirty(self) -> bool:
        """Whether footprints or pins changed since the last call (the broker saves them)."""
        dirty = self._pins_changed or self.moves.dirty
        self._pins_changed = self.moves.dirty = False
        return dirty

    # --- queries -------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        now = self.clock()
        return [daemon_row(daemon, self.book, now) for daemon in self.daemons.values()]

    def _note_ready(self, daemon: Daemon) -> None:
        """Remember its process as ready once registered and past the load ordered
        when it came up (if there was room for one), as `ps` would show it."""
        if daemon.identity is None or not daemon.pid or daemon.pid in daemon.ready_pids:
            return
        if shown_state(daemon) not in (DaemonState.STARTING, DaemonState.LOADING,
                                             DaemonState.CRASHED, DaemonState.STOPPED):
            daemon.ready_pids.append(daemon.pid)

    def device_rows(self) -> list[dict]:
        return self.book.device_rows()

    def row(self, name: str) -> dict:
        return daemon_row(self.daemons[name], self.book, self.clock())

    # --- unloads ------------------------------------------------------------

    def _fail_unload_waiters(self, daemon: Daemon, reason: str) -> None:
        waiters, daemon.unload_waiters = daemon.unload_waiters, []
        for request in waiters:
            self.requests.pop(request.key, None)
            self.effects.reply_error(request, DaemonCrashed(
                "daemon {} was lost while unloading: {}".format(daemon.name, reason)))

    # --- internals -----------------------------------------------------------

    def _apply_state(self, daemon: Daemon, update: dict) -> None:
        if update.get("state"):
            transition(daemon, update["state"], Cause.REPORT)
        if "error" in update:
            daemon.error = update.get("error")
        if update.get("facts") is not None:
            daemon.facts = update["facts"]
        if update.get("loads") is not None:
            daemon.loads = update["loads"]
        if isinstance(update.get("mem"), dict):
            daemon.mem = update["mem"]

    def _adopt(self, daemon: Daemon, call: dict) -> None:
        """A call still running in a daemon that registers with a restarted broker."""
        key = (call.get("client"), call.get("id"))
        if key in self.requests or key in self._abandoned or not isinstance(key[0], bytes):
            return
        slot = call.get("slot")
        # Its replies come from the slot it runs on, whatever index it is counted under.
        sender = daemon.slots[slot] if isinstance(slot, int) and 0 <= slot < len(daemon.slots) \
            else None
        free = daemon.free_slots()
        if slot not in free:
            # A register that does not say which slot: take the first free one
            # so the call still counts against the concurrency limit.
            slot = free[0] if free else None
        request = Request(client=key[0], id=key[1], model=daemon.name,
                          method=call.get("method") or "?", forward={}, payloads=[],
                          state=RequestState.RUNNING, enqueued_at=self.clock(),
                          started_at=self.clock(), slot=slot, sender=sender)
        request.reserved = daemon.footprint.peak(request.method)
        self.requests[key] = request
        daemon.running[key] = request

    def _unqueue(self, daemon: Daemon, request: Request) -> None:
        if request.action == Action.UNLOAD:
            daemon.unload_waiters.remove(request)
        else:
            daemon.pop(request)
        self.requests.pop(request.key, None)

    def _finish(self, request: Request) -> None:
        self.requests.pop(request.key, None)
        daemon = self.daemons.get(request.model)
        if daemon is not None:
            daemon.running.pop(request.key, None)

    def _expire(self, request: Request) -> None:
        daemon = self.daemons[request.model]
        message = "the {} did not finish within its timeout".format(
            "call" if request.action == Action.CALL else request.action.value)
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.effects.reply_error(request, Timeout(
                message + " (it was still queued; {} is {}, {} running and {} queued)".format(
                    daemon.name, daemon.state, len(daemon.running), daemon.queued())))
            return
        request.state = RequestState.ANSWERED
        self.effects.reply_error(request, Timeout(message + "; the daemon was told to stop it"))
        self.effects.cancel_remote(daemon, request)

    def _fail_running(self, daemon: Daemon, message: str) -> None:
        for request in list(daemon.running.values()):
            if request.state is RequestState.RUNNING:
                self.effects.reply_error(request, DaemonCrashed(message))
            self._finish(request)
            self._abandoned[request.key] = None
            while len(self._abandoned) > ABANDONED_REMEMBERED:
                self._abandoned.popitem(last=False)

    def _fail_queued(self, daemon: Daemon, error: ModelhostError) -> None:
        for queue in daemon.queues.values():
            while queue:
                request = queue.popleft()
                self.requests.pop(request.key, None)
                self.effects.reply_error(request, error)

    def _drop_client(self, client: bytes) -> None:
        del self.clients[client]
        for request in [r for r in self.requests.values() if r.client == client]:
            daemon = self.daemons[request.model]
            if request.state is RequestState.QUEUED:
                log.info("daemon=%s rid=%s dropped: its client went away", daemon.name, request.id)
                self._unqueue(daemon, request)
            elif request.state is RequestState.RUNNING:
                log.info("daemon=%s rid=%s cancelled: its client went away", daemon.name,
                         request.id)
                request.state = RequestState.ANSWERED
                self.effects.cancel_remote(daemon, request)

    def _stale_deadline(self, entry: tuple[float, int, Request]) -> bool:
        request = entry[2]
        return (self.requests.get(request.key) is not request
                or request.state is RequestState.ANSWERED)
