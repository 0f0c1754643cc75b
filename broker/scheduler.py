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

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Callable

from modelhost.errors import (
    BadMessage, DaemonCrashed, DaemonUnavailable, InternalError, ModelhostError, Timeout,
    UnknownModel,
)
from modelhost.protocol import DaemonState, Tier

from .accounting import MemoryBook
from .admission import refusal_of
from .config import Config
from .daemon_rows import daemon_row, shown_state
from .events import LOAD_FAILED, START_FAILED
from .footprints import Footprint
from .memory import MemoryReading
from .pump import Pump
from .scheduler_types import (
    Action, Daemon, Deadlines, Effects, Registered, Replies, Request, RequestKey, RequestState,
    Route, Routing,
)
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
        self.replies = Replies(effects, self.daemons, clock)
        self.clock = clock
        self.daemon_expiry_s = broker.daemon_expiry_s
        self.client_expiry_s = broker.client_liveness_s
        self.book = MemoryBook(self.daemons, broker.memory.limit_for)
        self.requests: dict[RequestKey, Request] = {}
        self.moves = TierMoves(self.book, effects, clock, self.daemon_expiry_s)
        self.pump = Pump(self.daemons, self.requests, self.book, broker.memory, effects,
                         self.replies, self.moves, clock, self.row)
        # client identity -> last time it said anything; a silent client's
        # queued work is dropped so nobody computes for a dead process.
        self.clients: dict[bytes, float] = {}
        self._deadlines = Deadlines(lambda request: self.requests.get(request.key) is request
                                    and request.state is not RequestState.ANSWERED)
        # Calls answered `daemon_crashed` whose daemon may only have been
        # silent: a late word from it must not become a second terminal reply.
        self._abandoned: OrderedDict[RequestKey, None] = OrderedDict()
        self._arrivals = 0
        self._pins_changed = False  # the broker saves them

    # --- client events -------------------------------------------------------

    def on_client_seen(self, client: bytes) -> None:
        self.clients[client] = self.clock()

    def on_call(self, request: Request) -> None:
        daemon = self.daemons.get(request.model)
        if request.key in self.requests:
            self.replies.error(request, BadMessage(
                "request id {!r} is already in use by this client; use a new id per request"
                .format(request.id)))
            return
        if daemon is None:
            self.replies.error(request, self._unknown_model(request.model))
            return
        refusal = refusal_of(self.book, daemon, request)
        if refusal is not None:
            self.replies.error(request, refusal)
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
            self._deadlines.add(request)
        self.pump.run()

    def on_cancel(self, client: bytes, request_id: Any) -> None:
        request = self.requests.get((client, request_id))
        if request is None or request.state is RequestState.ANSWERED:
            return  # already over: its terminal reply is sent or on its way
        daemon = self.daemons[request.model]
        if request.state is RequestState.QUEUED:
            self._unqueue(daemon, request)
            self.replies.cancelled(request, "cancelled before it started")
            self.pump.run()
        else:
            # The daemon stops cooperatively and answers `cancelled` itself.
            self.effects.cancel_remote(daemon, request)

    def knows(self, client: bytes, request_id: Any) -> bool:
        request = self.requests.get((client, request_id))
        return request is not None and request.state is not RequestState.ANSWERED

    def set_pinned(self, name: str, pinned: bool) -> dict:
        """Pin or unpin a daemon; its row after the change. UnknownModel for no such daemon."""
        daemon = self.daemons.get(name)
        if daemon is None:
            raise self._unknown_model(name)
        if daemon.pinned != pinned:
            daemon.pinned = pinned
            self._pins_changed = True
            log.info("daemon=%s %s", name, "pinned: never evicted" if pinned else "unpinned")
            self.pump.run()
        return self.row(name)

    def _unknown_model(self, name: str) -> UnknownModel:
        return UnknownModel("no model named {!r}; this broker serves: {}".format(
            name, ", ".join(self.daemons) or "none"))

    # --- daemon events -------------------------------------------------------

    def refuse_registration(self, name: str, identity: bytes,
                            exited: bool | None) -> BadMessage | None:
        """Why a registration under `name` from socket `identity` is refused, or None.

        A live daemon keeps its name: another socket may not take it while the
        registered process lives (`exited`: what the broker's pidfd of it says;
        None without one, and then its heartbeats decide). Whatever pid the
        newcomer claims is only its word.
        """
        daemon = self.daemons.get(name)
        if daemon is None or daemon.identity in (None, identity):
            return None
        alive = not exited if exited is not None else \
            self.clock() - daemon.last_seen <= self.daemon_expiry_s
        if not alive:
            return None  # a restarted daemon, whose old process the pidfd saw exit
        return BadMessage("daemon {} is registered by pid {}, which is alive; stop it first, "
                          "or give this daemon another name".format(name, daemon.pid))

    def on_daemon_registered(self, name: str, identity: bytes, info: dict) -> Registered | None:
        """A daemon's process (re)registered; None for a name the configuration lacks."""
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
        target = daemon.target
        daemon.take_registration(identity, info, now)
        # Calls still running in a daemon that registers with a restarted broker.
        for call in info.get("running") or []:
            key = (call.get("client"), call.get("id"))
            if key in self.requests or key in self._abandoned or not isinstance(key[0], bytes):
                continue
            request = daemon.adopt(call, now)
            self.requests[key] = daemon.running[key] = request
        if target == Tier.RESIDENT and daemon.tier != Tier.RESIDENT:
            # Started to serve a waiting request: its room is still reserved.
            self.moves.move(daemon, Tier.RESIDENT, "started for a waiting request", "request")
        self.pump.run()
        self._note_ready(daemon)
        return Registered(daemon.pid, tuple(daemon.slots), daemon.interpreter, daemon.state)

    def on_daemon_state(self, name: str, update: dict) -> None:
        daemon = self.daemons[name]
        daemon.last_seen = self.clock()
        daemon.take_report(update)
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
                 terminal: bool, mem: dict | None = None, sender: bytes | None = None) -> Routing:
        """A daemon's reply for a call: where it goes, and for a terminal reply that
        is forwarded, its request, with what ended.

        `sender` is the socket it came from: a reply for a call from any socket
        but the slot the call was dispatched to is refused.
        """
        request = self.requests.get((client, request_id))
        if request is not None and sender is not None and request.sender is not None \
                and sender != request.sender:
            log.warning("daemon=%s rid=%s refused a reply from %r: the call runs on %r",
                        request.model, request_id, sender, request.sender)
            return Routing(Route.DROP)
        if request is None:
            if (client, request_id) in self._abandoned:
                return Routing(Route.DROP)  # its caller already has `daemon_crashed`
            # Unknown here (this broker restarted mid-call): the daemon's word
            # is the only copy of the answer, so pass it on.
            return Routing(Route.UNCLAIMED)
        if request.state is not RequestState.RUNNING:
            route = Routing(Route.DROP)  # answered early: its client has its reply
        elif terminal:
            self.replies.end(request)
            route = Routing(Route.FORWARD, request)
        else:
            route = Routing(Route.FORWARD)
        if terminal:
            daemon = self.daemons.get(request.model)
            if daemon is not None and request.key in daemon.running:
                self.moves.call_ended(daemon, request, mem)
            self._finish(request)
            self.pump.run()
        return route

    def on_malformed_reply(self, sender: bytes, client: bytes, request_id: Any) -> None:
        """A terminal reply from `sender` that is unusable: its call, if `sender` runs it,
        still ends, with an internal error in the reply's place."""
        request = self.requests.get((client, request_id))
        if request is None or request.sender not in (None, sender):
            return
        if self.on_reply(request.model, client, request_id, True, None, sender).route \
                is Route.FORWARD:
            self.replies.error(request, InternalError(
                "daemon {} sent a malformed reply; its log and the broker's have the details"
                .format(request.model)))

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
        # A report can make a waiting call startable: processes may be stopped
        # again (can_stop), a daemon is starting, or queued calls were failed.
        self.pump.run()

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
        times = [d.retry_at for d in self.daemons.values() if d.retry_at]
        deadline = self._deadlines.next()
        if deadline is not None:
            times.append(deadline)
        if self.pump.waiting:
            times.append(self.clock() + WAIT_RECHECK_S)
        for daemon in self.daemons.values():
            expiry = ttl_expiry(daemon)
            if expiry is not None:
                times.append(expiry)
        return min(times, default=None)

    def on_tick(self) -> None:
        now = self.clock()
        for request in self._deadlines.due(now):
            self._expire(request)
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

    # --- what the broker asks ------------------------------------------------

    def daemon_states(self) -> Iterator[tuple[str, str, str, str | None]]:
        """(name, state, tier, last error) of each daemon, in configuration order."""
        for daemon in self.daemons.values():
            yield daemon.name, daemon.state, daemon.tier, daemon.error

    def control_sockets(self) -> list[bytes]:
        """The control socket of each registered daemon (heartbeats go there)."""
        return [d.identity for d in self.daemons.values() if d.identity is not None]

    def registered_pids(self) -> list[int]:
        """The pid of each registered daemon, for the memory probe."""
        return [d.pid for d in self.daemons.values() if d.identity is not None and d.pid]

    def has_running_calls(self) -> bool:
        return any(d.running for d in self.daemons.values())

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
            self.replies.error(request, DaemonCrashed(
                "daemon {} was lost while unloading: {}".format(daemon.name, reason)))

    # --- internals -----------------------------------------------------------

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
            self.replies.error(request, Timeout(
                message + " (it was still queued; {} is {}, {} running and {} queued)".format(
                    daemon.name, daemon.state, len(daemon.running), daemon.queued())))
            return
        request.state = RequestState.ANSWERED
        self.replies.error(request, Timeout(message + "; the daemon was told to stop it"))
        self.effects.cancel_remote(daemon, request)

    def _fail_running(self, daemon: Daemon, message: str) -> None:
        for request in list(daemon.running.values()):
            if request.state is RequestState.RUNNING:
                self.replies.error(request, DaemonCrashed(message))
            self._finish(request)
            self._abandoned[request.key] = None
            while len(self._abandoned) > ABANDONED_REMEMBERED:
                self._abandoned.popitem(last=False)

    def _fail_queued(self, daemon: Daemon, error: ModelhostError) -> None:
        for queue in daemon.queues.values():
            while queue:
                request = queue.popleft()
                self.requests.pop(request.key, None)
                self.replies.error(request, error)

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
