"""The cluster router: a broker-compatible endpoint in front of the nodes' brokers.

It binds a ZeroMQ ROUTER and speaks the client side of the wire (call, cancel, ping,
ps, load, unload, pin, unpin), so `modelhost.Client`, `AsyncClient`, the command line,
the gateway and the pipelines work through it unchanged. Each request goes to one node
(placement.choose over the nodes' published status) as actor calls to that node's
agent: `begin`, which answers with the first replies, then, unless that was all, the
stream `rest`; the replies (partial, progress, the terminal one) go out to the client
as they come, under its own request id. A cancel is passed on to the
agent, whose broker answers `cancelled` through the same stream. When the node's agent
dies under a request (the node is lost), the request ends with `daemon_crashed` and
the node takes no new ones.

One asyncio loop, no locks; Ray is reached only through the actor handles of Nodes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass

import zmq
import zmq.asyncio

from modelhost import protocol
from modelhost.errors import (BadMessage, Cancelled, DaemonCrashed, DaemonUnavailable,
                              InternalError, ModelhostError, Timeout, UnknownModel)

from . import placement
from .nodes import Node, Nodes, NodeState, describe_error

log = logging.getLogger("modelhost.cluster")

# While every node that runs a daemon is still starting, a call waits for one this long
# at most (unless its own timeout is shorter); the broker of a node would queue it too.
START_WAIT_S = 600.0
SWEEP_S = 1.0
# Ops relayed to one node, chosen like a call; those applied on every node that runs it.
ROUTED_OPS = (protocol.CALL, protocol.LOAD)
EVERY_NODE_OPS = (protocol.UNLOAD, protocol.PIN, protocol.UNPIN)


@dataclass
class Request:
    client: bytes
    id: object
    header: dict
    frame: bytes  # the header as it came, which the agent relays
    key: str  # the agents know it by this
    task: asyncio.Task | None = None
    node: Node | None = None  # where it runs, once sent


class Router:
    def __init__(self, nodes: Nodes, endpoint: str, *, config_path: str | None = None,
                 client_liveness_s: float = 10.0, max_frame: int | None = None, context=None):
        self.nodes = nodes
        self.endpoint = endpoint
        # A hard cap per frame from clients, as the broker's frontend has.
        self.max_frame = max_frame
        self.config_path = config_path
        self.client_liveness_s = client_liveness_s
        self.instance = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.context = context or zmq.asyncio.Context.instance()
        self.socket = None
        self.requests: dict[tuple, Request] = {}  # (client, request id) -> Request
        self.heard: dict[bytes, float] = {}  # client -> when it last spoke
        self.seq = itertools.count(1)

    def bind(self) -> None:
        from modelhost.broker.broker import prepare_ipc

        prepare_ipc(self.endpoint)  # owner-only directory; refuses a live socket
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.max_frame is not None:
            self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        self.socket.bind(self.endpoint)

    async def serve(self) -> None:
        if self.socket is None:
            self.bind()
        sweeper = asyncio.ensure_future(self._sweep())
        try:
            while True:
                frames = await self.socket.recv_multipart(copy=False)
                try:
                    self._on_message(frames)
                except Exception:
                    log.exception("a client message could not be handled")
        finally:
            sweeper.cancel()
            tasks = [r.task for r in self.requests.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each answers cancelled
            self.socket.close(linger=0)

    # --- from clients ---------------------------------------------------------

    def _on_message(self, frames) -> None:
        client = frames[0].bytes
        self.heard[client] = time.monotonic()
        try:
            header, payloads = protocol.decode(frames[1:])
            protocol.check_request(header)
        except ModelhostError as exc:
            self._send(client, protocol.error_reply((exc.details or {}).get("id"), exc))
            return
        op, request_id = header["op"], header["id"]
        if op == protocol.PING:
            known = [rid for rid in header.get("ids") or [] if (client, rid) in self.requests]
            self._send(client, protocol.pong_reply(request_id, known, self.instance, True))
        elif op == protocol.PS:
            self._send(client, protocol.result_reply(request_id, self.status()))
        elif op == protocol.CANCEL:
            self._cancel(self.requests.get((client, request_id)))
        elif op in ROUTED_OPS + EVERY_NODE_OPS:
            if (client, request_id) in self.requests:
                self._send(client, protocol.error_reply(request_id, BadMessage(
                    "request id {!r} is already in use by a request of this client".format(
                        request_id))))
                return
            request = Request(client=client, id=request_id, header=header,
                              frame=frames[1].bytes,
                              key="{}-{}".format(self.instance, next(self.seq)))
            self.requests[(client, request_id)] = request
            run = self._route if op in ROUTED_OPS else self._everywhere
            request.task = asyncio.ensure_future(run(request, [f.bytes for f in payloads]))
        else:
            self._send(client, protocol.error_reply(request_id, BadMessage(
                "the cluster router does not take {!r} requests (a node's supervisor talks "
                "to its own broker)".format(op))))

    def _cancel(self, request: Request | None) -> None:
        if request is None:
            return
        if request.node is not None:
            request.node.agent.cancel.remote(request.key)
        elif request.task is not None:
            request.task.cancel()  # still waiting for a node: it answers cancelled itself

    async def _sweep(self) -> None:
        """A client silent for client_liveness_s (it pings every second while it waits)
        has gone away: its requests are cancelled, as a broker does."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for client, heard in list(self.heard.items()):
                if now - heard > self.client_liveness_s:
                    del self.heard[client]
                    for (owner, _), request in list(self.requests.items()):
                        if owner == client:
                            log.info("rid=%s the client went away; cancelling", request.id)
                            self._cancel(request)

    # --- to nodes ---------------------------------------------------------------
    #
    # A reply on its way to a client is either what a node sent, (header, payload
    # frames), or the router's own: a ModelhostError (Cancelled included).

    async def _route(self, request: Request, payloads: list) -> None:
        """Relay to the node placement.choose picks; exactly one terminal reply."""
        header = request.header
        try:
            node = await self._pick(header["model"], header.get("timeout"))
            if isinstance(node, ModelhostError):  # no node can take it, and why
                self._deliver(request, node)
                return
            await self._relay(request, node, payloads, final=True)
        except asyncio.CancelledError:
            self._deliver(request, Cancelled("cancelled before it reached a node"))
        except Exception as exc:
            log.exception("rid=%s routing failed", request.id)
            self._deliver(request, InternalError("the cluster router failed on this request: "
                                                 "{}".format(describe_error(exc))))
        finally:
            self.requests.pop((request.client, request.id), None)

    async def _pick(self, daemon: str, timeout):
        """The Node for a request to `daemon`, or the error that says why there is none.
        While every node that runs it is still starting, it waits for one (at most the
        request's own timeout, or START_WAIT_S)."""
        started = time.monotonic()
        while True:
            choice = placement.choose(self.nodes.candidates(daemon))
            if choice is not None:
                return self.nodes.nodes[choice.node]
            starting = [node for node in self.nodes.serving(daemon)
                        if node.state is NodeState.STARTING]
            waited = time.monotonic() - started
            if not starting or waited > START_WAIT_S:
                return self._no_node(daemon)
            if timeout is not None and waited > timeout:
                return Timeout("no node that runs {!r} came up within the request's timeout "
                               "({:g}s): {}".format(daemon, timeout, _states(starting)))
            self.nodes.changed.clear()
            try:
                await asyncio.wait_for(self.nodes.changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _no_node(self, daemon: str) -> ModelhostError:
        if daemon not in self.nodes.daemons:
            return UnknownModel("no daemon named {!r} in the cluster; it serves: {}".format(
                daemon, ", ".join(self.nodes.daemons)))
        return DaemonUnavailable(_unavailable(daemon, self.nodes.serving(daemon),
                                              self.nodes.settings.rule(daemon)))

    async def _relay(self, request: Request, node: Node, payloads: list, *, final: bool):
        """Forward the request's replies from `node` as they come; returns its terminal
        reply. With final=False the terminal reply is returned, not sent (ops on every
        node)."""
        daemon = request.header["model"]
        request.node = node
        node.in_flight[daemon] += 1
        node.served += 1
        try:
            batch, done = await node.agent.begin.remote(request.key, request.frame, payloads)
            batches = None
            while True:
                for packed in batch:
                    reply = protocol.decode(packed)
                    if reply[0].get("kind") in protocol.TERMINAL_KINDS:
                        if final:
                            self._deliver(request, reply)
                        return reply
                    if final:
                        self._deliver(request, reply)
                if done:
                    break
                if batches is None:
                    batches = node.agent.rest.remote(request.key)
                try:
                    batch, done = await (await batches.__anext__())
                except StopAsyncIteration:
                    break
            reply = InternalError("node {} ended the request without an answer".format(
                node.info.name))
        except Exception as exc:
            if not _lost(exc):
                raise
            self.nodes.lost(node, "its agent died during a request: {}".format(
                describe_error(exc)))
            reply = DaemonCrashed("node {} ({}) was lost while it ran this request ({}); new "
                                  "requests go to the other nodes".format(
                                      node.info.name, node.info.address,
                                      describe_error(exc)),
                                  {"daemon": daemon, "node": node.info.name})
        finally:
            node.in_flight[daemon] -= 1
            node.call_ended_at[daemon] = time.time()
        if final:
            self._deliver(request, reply)
        return reply

    async def _everywhere(self, request: Request, payloads: list) -> None:
        """unload, pin, unpin: on every up node that runs the daemon; the first node's
        answer is the reply (its row), or the first error when none succeeded."""
        daemon = request.header["model"]
        try:
            nodes = [self.nodes.nodes[c.node] for c in self.nodes.candidates(daemon)]
            if not nodes:
                self._deliver(request, self._no_node(daemon))
                return
            answers = await asyncio.gather(*(self._relay(request, node, payloads, final=False)
                                             for node in nodes))
            ok = [answer for answer in answers if not isinstance(answer, ModelhostError)
                  and answer[0].get("kind") == protocol.RESULT]
            self._deliver(request, (ok or answers)[0])
        except asyncio.CancelledError:
            self._deliver(request, Cancelled("cancelled"))
        finally:
            self.requests.pop((request.client, request.id), None)

    # --- replies ----------------------------------------------------------------

    def _deliver(self, request: Request, reply) -> None:
        """A reply to the request's client under its own id: a node's, with only its id
        changed (the agent's own id on the node), or the router's own error."""
        if isinstance(reply, Cancelled):
            frames = protocol.cancelled_reply(request.id, reply.message)
        elif isinstance(reply, ModelhostError):
            frames = protocol.error_reply(request.id, reply)
        else:
            header, payloads = reply
            header = {key: item for key, item in header.items() if key not in ("v", "client")}
            header["id"] = request.id
            frames = protocol.encode(header, payloads)
        self._send(request.client, frames)

    def _send(self, client: bytes, frames: list) -> None:
        if self.socket.closed:
            return
        try:
            self.socket.send_multipart([client] + frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("a reply for a client that is gone was dropped: %s", exc)

    # --- status ---------------------------------------------------------------

    def status(self) -> dict:
        """A broker's `ps` for the whole cluster: every node's daemon rows and devices,
        named NODE/DEVICE (so `modelhost ps` tells the nodes apart), and the nodes."""
        daemons, devices = [], []
        for node in sorted(self.nodes.nodes.values(), key=lambda node: node.info.name):
            status = (node.published or {}).get("status")
            if node.state is not NodeState.UP or not status:
                continue
            prefix = node.info.name + "/"
            for row in status.get("daemons") or []:
                daemons.append(dict(row, node=node.info.name,
                                    device=prefix + str(row.get("device") or "?")))
            for device in (status.get("memory") or {}).get("devices") or []:
                devices.append(dict(device, id=prefix + str(device.get("id")),
                                    name=prefix + str(device.get("name"))))
        nodes = self.nodes.rows()
        return {
            "broker": {"pid": os.getpid(), "instance": self.instance,
                       "uptime_s": time.monotonic() - self.started, "protocol": protocol.VERSION,
                       "frontend": self.endpoint, "events": None, "http": None,
                       "config": self.config_path, "cluster": True},
            "time": time.time(),
            "memory": {"probe": "cluster", "reason": "{} of {} nodes up".format(
                sum(1 for row in nodes if row["state"] == NodeState.UP.value), len(nodes)),
                "devices": devices},
            "daemons": daemons,
            "nodes": nodes,
            "stop": [],
        }


def _lost(exc: BaseException) -> bool:
    """Whether a Ray error means the agent (its process or its node) is gone, rather
    than a bug raised inside it."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        return False
    return isinstance(exc, ray.exceptions.RayError)


def _states(nodes: list[Node]) -> str:
    return ", ".join("{} {}{}".format(node.info.name, node.state.value,
                                      " ({})".format(node.reason) if node.reason else "")
                     for node in nodes)


def _unavailable(daemon: str, serving: list[Node], rule) -> str:
    if not serving:
        return ("no node runs {!r}: no node up has the labels it needs ({})".format(
            daemon, ", ".join(sorted(rule.labels))) if rule.labels else
            "no node runs {!r} yet: no GPU node with an agent".format(daemon))
    return "no node that runs {!r} is up: {}; it serves again once one of them (or a node " \
           "that may run it) rejoins".format(daemon, _states(serving))
