"""The broker process: two ROUTER sockets and one poll loop around the scheduler.

The loop turns frames, daemon process exits (pidfds) and timer ticks into
scheduler events, and carries out the scheduler's effects as frames. Payload
frames are forwarded as the zmq.Frame objects they arrived in: never decoded,
never copied. Nothing here blocks on a daemon, and no input can kill the loop:
a bad message is answered with an error where a reply is possible and logged
where not.

Its length (about 780 lines): the one poll loop and the scheduler's effects are one
concept, the only code that touches the broker's sockets; the decisions are in the
scheduler modules and the wire in modelhost.protocol, so what is left here is the
routing of each message kind, which reads best in one place.
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import signal
import socket
import time
import uuid
from collections import OrderedDict

import zmq

from modelhost import _shm, protocol
from modelhost.protocol import DaemonState
from modelhost.errors import BadMessage, Cancelled, InternalError, ModelhostError, UnknownModel

from .config import Config, shm_dir
from .curve import Curve
from .events import OK, EventLog
from .footprints import STATE_FILE, FootprintStore, fingerprint
from .memory import MemoryProbe, choose_probe
from .parking import Parking
from .scheduler import Scheduler
from .scheduler_types import Action, Request, Route
from .sd_notify import Notifier
from .systemd_daemons import SystemdDaemons

log = logging.getLogger("modelhost.broker")

# Terminal replies of unknown calls that were delivered, remembered to drop copies.
DELIVERED_REMEMBERED = 4096


def prepare_ipc(endpoint: str) -> None:
    """Create the ipc socket's directory, owner-only, and clear a stale socket file."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # A directory in a shared place (/tmp) that someone else made first would
    # let them swap our sockets: refuse it rather than serve through it.
    info = os.stat(directory)
    if info.st_uid != os.getuid():
        raise PermissionError("{} belongs to uid {}, not to this user ({}); remove it or set "
                              "runtime_dir".format(directory, info.st_uid, os.getuid()))
    if info.st_mode & 0o022:
        os.chmod(directory, info.st_mode & ~0o022 & 0o7777)
    if os.path.exists(path):
        if _listening(path):
            raise OSError("another broker is already serving at {}; stop it first or "
                          "configure another runtime_dir".format(endpoint))
        os.unlink(path)  # a stale file from a broker that died


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Broker:
    def __init__(self, config: Config, *, clock=time.monotonic, parent_pid: int | None = None,
                 probe: MemoryProbe | None = None, systemd_scope: str | None = None):
        self.config = config
        self.probe = probe or choose_probe(config.broker.memory.probe)
        self.clock = clock
        self.parent_pid = parent_pid
        self.instance = uuid.uuid4().hex[:12]
        self.started = clock()
        broker = config.broker
        self.store = FootprintStore(
            broker.state_dir / STATE_FILE,
            {name: fingerprint(d.engine, d.options, d.python, str(d.venv), d.device)
             for name, d in config.daemons.items()})
        self.scheduler = Scheduler(config, self, clock, footprints=self.store.footprints,
                                   pins=self.store.pins)
        # Daemons whose process the memory manager stopped: the supervisor
        # reads this from `status()` and keeps them stopped until it empties.
        self.stopped_for_memory: set[str] = set()
        self.context = zmq.Context()
        self.curve = Curve(self.context, broker.curve)  # before the first bind
        # A hard cap per frame from clients; the per-daemon limit is checked
        # softly with an error reply, this one protects the broker's memory.
        # Daemons are trusted and may answer with more (a rendered video).
        self.frontend = self._router(broker.frontend, max_frame=broker.max_payload_bytes + 2**20)
        # Daemons are capped too: a peer on the daemon socket must not make the
        # broker buffer gigabytes (the runtime answers payload_too_large first).
        self.backend = self._router(broker.backend, max_frame=broker.max_reply_bytes + 2**20)
        # Sending to a socket that is not connected raises instead of vanishing:
        # a call is never lost to a slot that is reconnecting, and a reply for a
        # client that is reconnecting is held for it (self.held_for_clients).
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.held_for_clients = Parking(max_bytes=4 * broker.max_reply_bytes)
        self.held_from_slots = Parking(max_bytes=2 * broker.max_reply_bytes)
        # Replies for calls this broker does not know (they ended while it was
        # down, or a daemon sent a reply again after a restart): only the client
        # knows whether it still waits for one, and its next ping says so. So
        # each reaches the client once, never a second time.
        self.unclaimed = Parking(max_bytes=4 * broker.max_reply_bytes)
        self.delivered_unclaimed: OrderedDict[tuple, None] = OrderedDict()
        # Only the supervisor that started this broker knows it (it is passed in
        # the broker's environment, which other users cannot read): process
        # reports from anyone else are refused.
        self.supervisor_token = os.environ.pop("MODELHOST_SUPERVISOR_TOKEN", None)
        self.peers: dict[bytes, str] = {}  # routing id of a daemon socket -> daemon name
        # Shared memory: the broker only tells clients which daemons share their
        # segment dir (each daemon's token, from its registration), unlinks what
        # a reply it drops brought, and sweeps what dead processes owned.
        self.shm_dir = str(shm_dir(broker))
        self.shm_tokens: dict[str, str | None] = {}
        self.next_sweep = clock()
        self.poller = zmq.Poller()
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.pidfds: dict[int, str] = {}  # fd -> daemon name
        self.stopping = False
        self.systemd = Notifier()
        # The event stream: a PUB socket never blocks, and drops events for a
        # subscriber that does not keep up rather than hold up routing.
        self.event_socket = self.context.socket(zmq.PUB)
        self.event_socket.setsockopt(zmq.LINGER, 0)
        self.curve.serve(self.event_socket, broker.events)
        prepare_ipc(broker.events)
        self.event_socket.bind(broker.events)
        self.events = EventLog(sinks=[self._publish_event])
        self.announced: dict[str, tuple] = {}  # daemon name -> (state, tier) last announced
        # Under systemd (`--systemd system|user`) the daemons' processes are
        # systemd's units: stopping one to free memory is a request to systemd.
        self.units = None
        if systemd_scope is not None:
            self.units = SystemdDaemons(list(config.daemons), systemd_scope)
        self.web = None
        self.web_state = None
        if broker.http is not None:
            self._open_web(broker.http)

    def _open_web(self, address: tuple[str, int]) -> None:
        """The metrics and dashboard server; the broker routes on without it if it cannot."""
        try:
            from .metrics import Metrics
            from .web_server import WebServer, WebState
        except ImportError as exc:
            log.error("no metrics or dashboard: %s (pip install 'modelhost[host]')", exc)
            return
        self.web_state = WebState()
        metrics = Metrics(list(self.config.daemons), lambda: self.web_state.published.status)
        try:
            self.web = WebServer(address, self.web_state, metrics)
        except OSError as exc:
            log.error("no metrics or dashboard: cannot listen on %s:%d: %s; set broker.http "
                      "to a free port (or null)", address[0], address[1], exc)
            self.web_state = None
            return
        self.events.sinks.append(metrics.observe)

    def _router(self, endpoint: str, max_frame: int | None = None) -> zmq.Socket:
        router = self.context.socket(zmq.ROUTER)
        # A peer that reconnects with its identity takes over its old route.
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Never drop a reply because a peer is slow to read: a lost terminal
        # reply would break the one-terminal-reply contract.
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.LINGER, 0)
        if max_frame is not None:
            router.setsockopt(zmq.MAXMSGSIZE, max_frame)
        self.curve.serve(router, endpoint)
        prepare_ipc(endpoint)
        router.bind(endpoint)
        return router

    # --- effects (called by the scheduler) ----------------------------------

    def dispatch(self, daemon, request: Request) -> bool:
        timeout = None if request.deadline is None else max(0.0, request.deadline - self.clock())
        if not self._to_daemon(request.sender, protocol.dispatch_message(
                request.id, request.client, request.forward, request.payloads, timeout)):
            return False
        # The broker keeps no reference to payloads once they are sent.
        request.payloads = []
        return True

    def cancel_remote(self, daemon, request: Request) -> None:
        if daemon.identity is not None:
            self._to_daemon(daemon.identity, protocol.cancel_message(request.id, request.client))

    def _to_daemon(self, identity: bytes, frames: list) -> bool:
        try:
            protocol.send(self.backend, [identity] + frames)
            return True
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return False

    def set_tier(self, daemon, tier: str) -> None:
        if daemon.identity is not None:
            self._to_daemon(daemon.identity, protocol.tier_message(tier))

    def set_process(self, daemon, running: bool) -> None:
        if running:
            self.stopped_for_memory.discard(daemon.name)
        else:
            self.stopped_for_memory.add(daemon.name)
        if self.units is not None:
            self.units.set_running(daemon.name, running)

    def reply_result(self, request: Request, value) -> None:
        self._to_client(request.client, protocol.result_reply(request.id, value))
        self._ended(request, OK)

    def reply_error(self, request: Request, error: ModelhostError) -> None:
        log.info("daemon=%s rid=%s error %s: %s", request.model, request.id, error.code,
                 error.message)
        self._to_client(request.client, protocol.error_reply(request.id, error))
        self._ended(request, error.code, error.message)

    def reply_cancelled(self, request: Request, message: str) -> None:
        self._to_client(request.client, protocol.cancelled_reply(request.id, message))
        self._ended(request, Cancelled.code)

    def event(self, kind: str, daemon: str | None, **fields) -> None:
        self.events.emit(kind, daemon, **fields)

    def _ended(self, request: Request, outcome: str, message: str | None = None) -> None:
        """A request got its one terminal reply: the `request` event (and `error`), from
        what the scheduler says ended (`request.ended`)."""
        daemon, method, queue_s, run_s = request.ended
        rid = str(request.id)
        if log.isEnabledFor(logging.DEBUG):  # once per call: no formatting unless shown
            log.debug("daemon=%s rid=%s %s %s: queued %.3fs, ran %s", request.model, rid,
                      request.method, outcome, queue_s, "-" if run_s is None else
                      "{:.3f}s".format(run_s))
        self.events.emit("request", daemon, method=method, rid=rid, priority=request.priority,
                         outcome=outcome, queue_s=queue_s, run_s=run_s)
        if message is not None:
            self.events.emit("error", daemon, level="warning", rid=rid, code=outcome,
                             message=message)

    def _publish_event(self, event: dict) -> None:
        protocol.send(self.event_socket, protocol.encode_event(event))

    def _announce_states(self) -> None:
        """A `state` event for each daemon whose state or tier changed since the last look."""
        for name, state, tier, error in self.scheduler.daemon_states():
            now = (state, tier)
            before = self.announced.get(name)
            if now == before:
                continue
            self.announced[name] = now
            level = {DaemonState.FAILED: "error", DaemonState.CRASHED: "warning"}.get(
                state, "info")
            self.events.emit("state", name, level=level, state=state,
                             previous=None if before is None else before[0], tier=tier,
                             error=error)

    def _to_client(self, client: bytes, frames: list, *, hold: bool = True) -> None:
        """Send to a client, or hold the message until it reconnects (see parking.py).

        `hold=False` for what is stale by the time a client comes back (a pong).
        """
        if not hold:
            try:
                protocol.send(self.frontend, [client] + frames)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
            return
        if client in self.held_for_clients:
            # Older messages wait for it already: keep the order.
            self._hold_for_client(client, frames)
            return
        try:
            protocol.send(self.frontend, [client] + frames)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._hold_for_client(client, frames)

    def _hold_for_client(self, client: bytes, frames: list) -> None:
        if not self.held_for_clients.hold(client, frames, self.clock()):
            log.error("dropped a reply for client %r, which is not connected: the replies "
                      "held for reconnecting clients are at their limit (%d bytes)", client,
                      self.held_for_clients.max_bytes)

    # --- frontend -----------------------------------------------------------

    def on_frontend(self, frames: list) -> None:
        if len(frames) < 2:
            log.warning("dropped a client message with no header frame")
            return
        client, frames = frames[0].bytes, frames[1:]
        try:
            header, payloads = protocol.decode(frames)
            protocol.check_request(header)
            if "shm" in header and not self._on_this_host(frames[0]):
                # Shared-memory references name files of this host: only its own
                # clients may send them (or offer to take a reply so).
                del header["shm"]
        except ModelhostError as exc:
            # Malformed: answered, and nothing of it reaches the scheduler. The
            # request id travels in the details only so far: the reply names it.
            self._to_client(client, protocol.error_reply(exc.details.pop("id", None), exc))
            return
        self.scheduler.on_client_seen(client)
        # The client is (back) on the line: what was kept for it goes first.
        for held in self.held_for_clients.release(client):
            self._to_client(client, held)
        op = header["op"]
        try:
            self._on_request(client, op, header, payloads)
        except Exception:
            # A bug, not bad input (that was refused above): the request still
            # gets its one terminal reply, and the loop goes on.
            log.exception("internal error while handling a client %s; answered `internal`", op)
            self._to_client(client, protocol.error_reply(header.get("id"), InternalError(
                "the broker failed on this {} (a bug; its log has the details)".format(op))))

    def _on_request(self, client: bytes, op: str, header: dict, payloads: list) -> None:
        request_id = header["id"]
        if op == protocol.CALL:
            self.on_call(client, header, payloads)
        elif op == protocol.CANCEL:
            self.scheduler.on_cancel(client, request_id)
        elif op == protocol.PING:
            waiting = header["ids"]
            self._deliver_unclaimed(client, set(waiting))
            known = [rid for rid in waiting if self.scheduler.knows(client, rid)]
            # Settled: up long enough for every live daemon to have registered
            # the calls it is running, so "unknown" now means lost.
            settled = self.clock() - self.started > self.config.broker.daemon_expiry_s + \
                self.config.broker.heartbeat_s
            self._to_client(client, protocol.pong_reply(request_id, known, self.instance,
                                                        settled), hold=False)
        elif op == protocol.PS:
            self._to_client(client, protocol.result_reply(request_id, self.status()))
        elif op in (protocol.LOAD, protocol.UNLOAD):
            self.on_tier_request(client, op, header)
        elif op in (protocol.PIN, protocol.UNPIN):
            name = header["model"]
            try:
                row = self.scheduler.set_pinned(name, op == protocol.PIN)
            except UnknownModel as error:
                self._to_client(client, protocol.error_reply(request_id, error))
                return
            self.store.pins[name] = op == protocol.PIN
            self.store.mark_dirty()
            self.store.save()
            self._to_client(client, protocol.result_reply(request_id, row))
        elif op == protocol.SUPERVISOR:
            if self.supervisor_token is None or not hmac.compare_digest(
                    header["token"], self.supervisor_token):
                log.warning("refused a supervisor report from a client that is not this "
                            "broker's supervisor")
                self._to_client(client, protocol.error_reply(request_id, BadMessage(
                    "supervisor reports come only from the supervisor that started this "
                    "broker (`modelhost up`)")))
                return
            self.scheduler.on_supervisor_report(header["processes"])
            self._to_client(client, protocol.result_reply(request_id, self.status()))

    def on_tier_request(self, client: bytes, op: str, header: dict) -> None:
        """`modelhost load/unload NAME`: a request answered once the daemon is at the tier."""
        self.scheduler.on_call(Request(
            client=client, id=header["id"], model=header["model"], method=op, forward={},
            payloads=[], priority=header["priority"], enqueued_at=self.clock(),
            action=Action.LOAD if op == protocol.LOAD else Action.UNLOAD,
            deadline=self._deadline(header)))

    def on_call(self, client: bytes, header: dict, payloads: list) -> None:
        request = Request(
            client=client, id=header["id"], model=header["model"], method=header["method"],
            forward=protocol.call_forward(header),
            payloads=payloads,
            # What lies in shared memory counts against the daemon's max_payload too.
            payload_bytes=sum(len(frame) for frame in payloads) + (
                header.get("shm") or {}).get("bytes", 0),
            priority=header["priority"], enqueued_at=self.clock(),
            deadline=self._deadline(header))
        self.scheduler.on_call(request)

    def _deadline(self, header: dict) -> float | None:
        # The schema let through a finite, positive timeout, or none (its default).
        timeout = header["timeout"]
        return None if timeout is None else self.clock() + float(timeout)

    # --- backend ------------------------------------------------------------

    def on_backend(self, frames: list) -> None:
        if len(frames) < 2:
            log.warning("daemon=%s dropped a daemon message with no header frame",
                        self.peers.get(frames[0].bytes) if frames else None)
            return
        identity, body = frames[0].bytes, frames[1:]
        name = self.peers.get(identity)
        try:
            header = protocol.decode_header(body[0])
            is_reply = "kind" in header
            if is_reply:
                protocol.check_reply(header)
            else:
                protocol.check_daemon_message(header)
        except ModelhostError as exc:
            # Nobody to answer on this socket: the daemon's log would not show it
            # anyway, so the broker's does.
            log.error("daemon=%s dropped a message from %r: %s", name, identity, exc)
            self._refuse_reply(identity, body)
            return
        what = header.get("kind") or header.get("op")
        try:
            if is_reply:
                self.on_daemon_reply(identity, name, header, body)
            else:
                self._on_daemon_message(identity, name, header)
        except Exception:
            log.exception("daemon=%s internal error while handling a daemon %s; dropped",
                          name, what)

    def _refuse_reply(self, identity: bytes, body: list) -> None:
        """A malformed reply for a call that its own slot runs: the call still ends.

        Whatever the daemon sent is unusable, so its caller gets a typed error
        in its place rather than waiting for ever.
        """
        try:
            header = protocol.decode_header(body[0])
        except ModelhostError:
            return
        kind, client, request_id = header.get("kind"), header.get("client"), header.get("id")
        if not (isinstance(kind, str) and kind in protocol.TERMINAL_KINDS
                and isinstance(client, bytes) and protocol.is_request_id(request_id)):
            return
        self.scheduler.on_malformed_reply(identity, client, request_id)

    def _on_daemon_message(self, identity: bytes, name: str | None, header: dict) -> None:
        op = header["op"]
        if op == protocol.REGISTER:
            self.on_register(identity, header)
            return
        if name is None:
            # The control socket of a daemon this broker does not know yet (it
            # restarted): have it register.
            self._to_daemon(identity, protocol.reregister_message())
            return
        self.scheduler.on_daemon_seen(name, header.get("mem") if op == protocol.HEARTBEAT
                                      else None)
        if op == protocol.STATE:
            log.info("daemon=%s state %s%s%s", name, header["state"],
                     " ({:.2f}s)".format(header["took_s"])
                     if header.get("took_s") is not None else "",
                     ": " + header["error"] if header.get("error") else "")
            # A fresh reading first: a finished move is confirmed by the probe.
            self._read_memory()
            self.scheduler.on_daemon_state(name, header)

    def on_register(self, identity: bytes, header: dict) -> None:
        name = header["name"]
        # Another socket under a live daemon's name: the live one keeps it, so a
        # stray or hostile peer cannot take its calls.
        refusal = self.scheduler.refuse_registration(name, identity, self._pid_exited(name))
        if refusal is not None:
            log.error("daemon=%s refused a registration from pid %s (%r): %s", name,
                      header["pid"], identity, refusal.message)
            self._to_daemon(identity, protocol.error_reply(None, refusal))
            return
        registered = self.scheduler.on_daemon_registered(name, identity, header)
        if registered is None:
            log.error("daemon=%s registered, but the configuration has no such daemon; "
                      "ignoring it", name)
            return
        for peer in [peer for peer, owner in self.peers.items() if owner == name]:
            del self.peers[peer]
        self.peers[identity] = name
        self.peers.update((slot, name) for slot in registered.slots)
        self.shm_tokens[name] = header.get("shm")
        log.info("daemon=%s registered: pid %s, %s, state %s, %d calls running",
                 name, registered.pid, registered.interpreter, registered.state,
                 len(header.get("running") or []))
        self._watch_pid(name, registered.pid)
        self._read_memory()
        # Replies its slots sent before this registration (a restarted broker).
        for slot in registered.slots:
            for held in self.held_from_slots.release(slot):
                self.on_backend([zmq.Frame(slot)] + held)

    def _deliver_unclaimed(self, client: bytes, waiting: set) -> None:
        """Replies for calls this broker does not know, to a client that still waits for them."""
        for held in self.unclaimed.take(client):
            request_id, terminal = held.tag
            key = (client, request_id)
            if request_id not in waiting or key in self.delivered_unclaimed:
                log.debug("rid=%s dropped a reply its client had already", request_id)
                if request_id not in waiting:  # (a copy's segments are the delivered one's)
                    self._unlink_segments(held.frames)
                continue
            self._to_client(client, held.frames)
            if terminal:
                # A ping sent before this reply arrived still lists the id.
                self.delivered_unclaimed[key] = None
                while len(self.delivered_unclaimed) > DELIVERED_REMEMBERED:
                    self.delivered_unclaimed.popitem(last=False)

    def _pid_exited(self, name: str) -> bool | None:
        """Whether the watched process of daemon `name` exited; None when none is watched."""
        fd = next((fd for fd, watched in self.pidfds.items() if watched == name), None)
        if fd is None:
            return None
        return bool(select.select([fd], [], [], 0)[0])  # a pidfd turns readable at exit

    def on_daemon_reply(self, identity: bytes, name: str | None, header: dict,
                        body: list) -> None:
        if name is None:
            # Not a registered slot: either a slot whose daemon has not
            # registered with this (restarted) broker yet, or a stranger.
            # Held until a registration names it, never forwarded before.
            if not self.held_from_slots.hold(identity, body, self.clock()):
                log.error("rid=%s dropped a reply from unregistered %r: no room to hold it",
                          header["id"], identity)
            return
        client = header["client"]
        terminal = header["kind"] in protocol.TERMINAL_KINDS
        route, request = self.scheduler.on_reply(name, client, header["id"], terminal,
                                               header.get("mem") if terminal else None,
                                               identity)
        if route is Route.UNCLAIMED:
            if not self.unclaimed.hold(client, body, self.clock(), tag=(header["id"], terminal)):
                log.error("daemon=%s rid=%s dropped a reply for a call this broker does "
                          "not know: no room to hold it", name, header["id"])
                self._unlink_segments(body)
        elif route is Route.FORWARD:
            # The daemon's header frame goes to the client unchanged.
            self._to_client(client, body)
            if request is not None:
                kind = header["kind"]
                if kind == protocol.RESULT:
                    self._ended(request, OK)
                elif kind == protocol.CANCELLED:
                    self._ended(request, Cancelled.code)
                else:
                    self._ended(request, header["code"], header.get("message") or "")
        elif "shm" in header:
            # Dropped (the call ended early): nobody will map what it brought.
            _shm.unlink_listed(self.shm_dir, header["shm"].get("segments"))

    # --- daemon processes ---------------------------------------------------

    def _watch_pid(self, name: str, pid: int | None) -> None:
        """Learn of the daemon's death the moment it happens, not a liveness later."""
        for fd, watched in list(self.pidfds.items()):
            if watched == name:
                self._unwatch(fd)
        if not pid or not hasattr(os, "pidfd_open"):
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError as exc:
            log.warning("daemon=%s cannot watch pid %s (%s); relying on heartbeats", name, pid, exc)
            return
        self.pidfds[fd] = name
        self.poller.register(fd, zmq.POLLIN)

    def _unwatch(self, fd: int) -> None:
        self.poller.unregister(fd)
        os.close(fd)
        del self.pidfds[fd]

    def on_pid_exit(self, fd: int) -> None:
        name = self.pidfds[fd]
        self._unwatch(fd)
        # Sweep first: by the time its callers hear of the crash, what the daemon
        # had in shared memory (its pooled files, a result it never sent) is gone.
        self._guarded("the shared-memory sweep", self._sweep)
        self.scheduler.on_daemon_lost(name, "the process exited")

    # --- shared memory --------------------------------------------------------

    def _on_this_host(self, frame) -> bool:
        """Whether a client message came from this host: the ipc socket (owner-only), or
        tcp from a loopback address."""
        if not self.config.broker.frontend.startswith("tcp://"):
            return True
        try:
            peer = frame.get("Peer-Address")
        except (AttributeError, zmq.ZMQError):
            return False
        return peer.startswith(("127.", "::1", "::ffff:127."))

    def _sweep(self) -> None:
        """Unlink the segments of processes that are gone (clients, daemons)."""
        self.next_sweep = self.clock() + _shm.SWEEP_S
        _shm.sweep(self.shm_dir)

    def _unlink_segments(self, frames: list) -> None:
        """A held reply that is dropped: unlink the segments it brought."""
        try:
            header = protocol.decode_header(frames[0])
        except ModelhostError:
            return
        _shm.unlink_listed(self.shm_dir, (header.get("shm") or {}).get("segments"))

    # --- status -------------------------------------------------------------

    def status(self) -> dict:
        return {
            "broker": {"pid": os.getpid(), "instance": self.instance,
                       "uptime_s": self.clock() - self.started,
                       "protocol": protocol.VERSION,
                       "frontend": self.config.broker.frontend,
                       "events": self.config.broker.events,
                       "http": self.web.url if self.web is not None else None,
                       "config": str(self.config.path) if self.config.path else None,
                       # What a client needs to send large payloads in shared memory.
                       "shm": {"dir": self.shm_dir,
                               "threshold": self.config.broker.shm.threshold,
                               "max_total": self.config.broker.shm.max_total,
                               "tokens": dict(self.shm_tokens)}},
            "time": time.time(),
            "memory": {"probe": self.probe.kind, "reason": self.probe.reason,
                       "devices": self.scheduler.device_rows()},
            "daemons": self.scheduler.snapshot(),
            # For the supervisor: processes stopped to free memory, kept down.
            "stop": sorted(self.stopped_for_memory),
        }

    # --- the loop -----------------------------------------------------------

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: setattr(self, "stopping", True))
        self._guarded("the shared-memory sweep", self._sweep)
        heartbeat_s = self.config.broker.heartbeat_s
        next_heartbeat = self.clock() + heartbeat_s
        log.info("broker %s listening: clients at %s, daemons at %s", self.instance,
                 self.config.broker.frontend, self.config.broker.backend)
        log.info("memory probe: %s (%s)", self.probe.kind, self.probe.reason)
        self._read_memory()
        for device in self.scheduler.device_rows():
            log.info("memory: %s: threshold %s, external memory %s", device["name"],
                     device.get("threshold_text"),
                     "counted" if device.get("external_counted") else "ignored")
        sample_s = self.config.broker.memory.sample_s
        next_sample = None
        # Fed from this loop, so a loop that hangs stops feeding it and
        # systemd restarts the broker.
        watchdog_s = self.systemd.watchdog_s
        next_watchdog = self.clock() + watchdog_s if watchdog_s else None
        if self.web is not None:
            self.web.start()
            log.info("metrics at %smetrics, dashboard at %s", self.web.url, self.web.url)
        next_publish = self.clock()
        self.systemd.ready("serving {} daemons; clients at {}".format(
            len(self.config.daemons), self.config.broker.frontend))
        while not self.stopping:
            # While calls run, the probe samples them for their peaks.
            busy = self.scheduler.has_running_calls()
            if busy and next_sample is None:
                next_sample = self.clock() + sample_s
            elif not busy:
                next_sample = None
            wakeup = min(filter(None, (next_heartbeat, next_sample, next_watchdog,
                                       next_publish if self.web_state else None,
                                       self.scheduler.next_wakeup())))
            timeout_ms = max(0.0, (wakeup - self.clock()) * 1000)
            for source, _ in self.poller.poll(timeout_ms):
                self._drain(source)
            now = self.clock()
            # Timers only when one is due: this loop runs once per message.
            if now >= wakeup:
                self._guarded("the timer tick", self.scheduler.on_tick)
            if next_sample is not None and now >= next_sample:
                next_sample = None
                self._guarded("the memory sample", self._read_memory)
            if now >= next_heartbeat:
                next_heartbeat = now + heartbeat_s
                self._guarded("the heartbeat", self._heartbeat)
            if next_watchdog is not None and now >= next_watchdog:
                next_watchdog = now + watchdog_s
                self._guarded("the watchdog", self.systemd.watchdog)
            self._guarded("the state announcement", self._announce_states)
            if self.web_state is not None and now >= next_publish:
                next_publish = now + self.web_state.interval_s
                self._guarded("the dashboard publish", lambda: self.web_state.publish(
                    self.status(), self.events.recent))
        log.info("broker stopping")
        if self.web is not None:
            self.web.close()
        if self.units is not None:
            self.units.close()
        self.systemd.stopping()
        self.store.save()
        self.curve.close()
        self.context.destroy(linger=0)
        self.systemd.close()
        return 0

    @staticmethod
    def _guarded(what: str, action) -> None:
        """Run one of the loop's own tasks; a bug in one is logged, never the loop's end."""
        try:
            action()
        except Exception:
            log.exception("internal error in %s; the broker goes on", what)

    def _drain(self, source) -> None:
        if isinstance(source, int):
            self._guarded("a daemon exit", lambda: self.on_pid_exit(source))
            return
        if source is self.frontend:
            handler, what = self.on_frontend, "a client message"
        else:
            handler, what = self.on_backend, "a daemon message"
        # The poll said readable, so the first receive cannot block; then EVENTS
        # rather than catching zmq.Again (an exception per wakeup is a
        # measurable cost). Bounded, so neither side can starve the other.
        for _ in range(1000):
            frames = protocol.recv(source)
            # Each handler catches its own bugs with the message's kind in the
            # line; this is the last net (a failure before the kind is known).
            try:
                handler(frames)
            except Exception:
                log.exception("internal error in %s; the broker goes on", what)
            if not protocol.readable(source):
                return

    def _heartbeat(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.error("the supervising process %s is gone; stopping", self.parent_pid)
            self.stopping = True
            return
        heartbeat = protocol.heartbeat_message()
        for identity in self.scheduler.control_sockets():
            self._to_daemon(identity, heartbeat)
        if self.units is not None:
            report = self.units.poll()
            if report:
                self.scheduler.on_supervisor_report(report)
        self._read_memory()
        if self.clock() >= self.next_sweep:
            self._sweep()
        if self.scheduler.take_dirty():
            self.store.mark_dirty()
        self.store.save()
        self._expire_held()

    def _expire_held(self) -> None:
        now = self.clock()
        gone = {client for client, _ in self.held_for_clients.expire(
            now, self.config.broker.client_liveness_s) + self.unclaimed.expire(
            now, self.config.broker.client_liveness_s)}
        for client in gone:
            log.info("dropped what was held for client %r: it did not come back within "
                     "client_liveness_s", client)
        # A restarted broker hears every live daemon register within a liveness.
        for slot, _ in self.held_from_slots.expire(now, 2 * self.config.broker.daemon_expiry_s):
            log.warning("dropped a reply from %r: no daemon registered that socket", slot)

    def _read_memory(self) -> None:
        try:
            reading = self.probe.read(self.scheduler.registered_pids())
        except Exception:
            # The probe failing must not stop routing: admission goes on with
            # the last reading and the footprints.
            log.exception("memory probe %s failed; memory figures are stale", self.probe.kind)
            return
        self.scheduler.on_memory(reading)
