"""The node watcher: one node agent per GPU node of the Ray cluster, and what each publishes.

Every WATCH_S it reads `ray.nodes()`: a node that qualifies (placement.wants_agent) and
has no live agent gets one, pinned to it (NodeAffinitySchedulingStrategy, not soft)
and holding all its GPUs, with the daemons placement.plan_daemons gives it. A node
whose agent died, or whose Ray node is gone, is *lost*; its Ray node, if still alive
(or once back), gets a new agent after a backoff, which re-registers it: it serves
again once its broker answers. Every `status_s` each agent's published status is read;
that is what the router routes on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import placement
from .agent import NodeAgent
from .placement import Candidate, NodeInfo
from .settings import ClusterSettings

log = logging.getLogger("modelhost.cluster")

WATCH_S = 2.0
# A node whose agent was lost (or failed to start) gets the next one after this, doubling.
RETRY_S = (2.0, 60.0)
# How long an agent may take to be scheduled and write its node's configuration.
AGENT_START_S = 120.0
STATUS_TIMEOUT_S = 5.0


class NodeState(enum.Enum):
    STARTING = "starting"  # agent placed; its broker has not answered yet (setup may take minutes)
    UP = "up"  # its broker's status is fresh: it takes calls
    LOST = "lost"  # its agent (or Ray node) died: its calls ended with daemon_crashed


@dataclass
class Node:
    info: NodeInfo
    daemons: list[str]  # what this node's broker runs
    agent: Any = None  # the Ray actor handle
    state: NodeState = NodeState.STARTING
    since: float = field(default_factory=time.time)
    published: dict | None = None  # the agent's last published(): its broker's ps and more
    reason: str | None = None  # why it is lost
    in_flight: Counter = field(default_factory=Counter)  # daemon -> router calls running there
    # When its broker's status was read (this clock), and when the router's last call to
    # each daemon there ended: a status from before that still shows the call running.
    status_at: float = 0.0
    call_ended_at: dict = field(default_factory=dict)
    served: int = 0  # calls routed here


class Nodes:
    def __init__(self, ray, settings: ClusterSettings, config_text: str,
                 config_path: str | None, daemons: list[str], *, setup: bool = True):
        self.ray = ray
        self.settings = settings
        self.config_text = config_text
        self.config_path = config_path
        self.daemons = list(daemons)  # every daemon of the configuration, in its order
        self.setup = setup
        self.nodes: dict[str, Node] = {}  # Ray node id -> the latest Node on it
        self.retry_at: dict[str, tuple[float, float]] = {}  # node id -> (when, next delay)
        self.tasks: set = set()
        self.changed = asyncio.Event()  # set whenever a node changes state

    # --- the loop -------------------------------------------------------------

    async def run(self) -> None:
        """Discover nodes every WATCH_S (after a first `discover()` by the caller)."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self.discover()
            except Exception:  # a GCS hiccup: the next round tries again
                log.exception("reading the Ray cluster's nodes failed")

    async def discover(self) -> None:
        loop = asyncio.get_running_loop()
        entries = await loop.run_in_executor(None, self.ray.nodes)
        alive = {}
        for entry in entries:
            if entry.get("Alive"):
                info = placement.node_info(entry)
                if placement.wants_agent(info, self.settings):
                    alive[info.node_id] = info
        for node_id, node in self.nodes.items():
            if node_id not in alive and node.state is not NodeState.LOST:
                self.lost(node, "its Ray node is gone")
        now = time.monotonic()
        joining = [info for node_id, info in sorted(alive.items())
                   if (node_id not in self.nodes or self.nodes[node_id].state is NodeState.LOST)
                   and self.retry_at.get(node_id, (0.0, 0.0))[0] <= now]
        if not joining:
            return
        serving = {node.info.name: frozenset(node.daemons) for node in self.nodes.values()
                   if node.state is not NodeState.LOST}
        plan = placement.plan_daemons(self.daemons, self.settings, joining, serving)
        for info in joining:
            node = self.nodes[info.node_id] = Node(info=info, daemons=plan[info.name])
            delay = self.retry_at.get(info.node_id, (0.0, RETRY_S[0]))[1]
            self.retry_at[info.node_id] = (now + delay, min(delay * 2, RETRY_S[1]))
            self._spawn(self._follow(node))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _follow(self, node: Node) -> None:
        """Start the node's agent, then read what it publishes until the node is lost."""
        if await self._start(node):
            while node.state is not NodeState.LOST:
                await self._read(node)
                await asyncio.sleep(self.settings.status_s)

    async def _start(self, node: Node) -> bool:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        info = node.info
        log.info("node %s (%s, %d GPUs, labels %s): starting its agent; it runs %s", info.name,
                 info.address, info.gpus, ", ".join(sorted(info.labels)) or "none",
                 ", ".join(node.daemons) or "no daemon")
        spec = {"node": info.name, "config_text": self.config_text,
                "config_path": self.config_path, "daemons": node.daemons, "setup": self.setup,
                "status_s": self.settings.status_s}
        actor = self.ray.remote(NodeAgent).options(
            num_cpus=0, num_gpus=info.gpus, max_restarts=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(info.node_id, soft=False))
        node.agent = actor.remote(spec)
        try:
            paths = await asyncio.wait_for(node.agent.start.remote(), AGENT_START_S)
        except Exception as exc:
            self.lost(node, "its agent did not start: {}".format(describe_error(exc)))
            self.kill(node)
            return False
        log.info("node %s: agent pid %s, its modelhost in %s", info.name, paths["agent_pid"],
                 paths["runtime_dir"])
        return True

    async def _read(self, node: Node) -> None:
        try:
            published = await asyncio.wait_for(node.agent.published.remote(), STATUS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return  # a busy agent; a dead one raises
        except Exception as exc:
            if node.state is not NodeState.LOST:
                self.lost(node, "its agent died: {}".format(describe_error(exc)))
            return
        if node.state is NodeState.LOST:
            return
        node.published = published
        node.status_at = time.time() - (published.get("status_age_s") or 0.0)
        state = NodeState.UP if published.get("status") else NodeState.STARTING
        if state is not node.state:
            if state is NodeState.UP:
                log.info("node %s: up, serving %s", node.info.name,
                         ", ".join(node.daemons) or "no daemon")
                self.retry_at.pop(node.info.node_id, None)
            else:
                log.warning("node %s: its broker does not answer: %s", node.info.name,
                            published.get("problem"))
            node.state, node.since = state, time.time()
            self.changed.set()

    def lost(self, node: Node, reason: str) -> None:
        if node.state is NodeState.LOST:
            return
        log.error("node %s lost: %s; its calls end with daemon_crashed, new calls go to the "
                  "other nodes", node.info.name, reason)
        node.state, node.reason, node.since = NodeState.LOST, reason, time.time()
        self.changed.set()

    def kill(self, node: Node) -> None:
        if node.agent is not None:
            try:
                self.ray.kill(node.agent)
            except Exception:
                pass

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        live = [node for node in self.nodes.values()
                if node.agent is not None and node.state is not NodeState.LOST]
        stops = [asyncio.wait_for(node.agent.stop.remote(), 60.0) for node in live]
        for node, outcome in zip(live, await asyncio.gather(*stops, return_exceptions=True)):
            if isinstance(outcome, Exception):
                log.warning("node %s did not stop cleanly: %s", node.info.name,
                            describe_error(outcome))
            self.kill(node)

    # --- what the router reads ------------------------------------------------

    def candidates(self, daemon: str) -> list[Candidate]:
        found = []
        for node in self.nodes.values():
            if node.state is not NodeState.UP or daemon not in node.daemons:
                continue
            status = node.published["status"]
            row = next((row for row in status.get("daemons") or []
                        if row.get("name") == daemon), None)
            if row is not None:
                found.append(Candidate(node=node.info.node_id, row=row,
                                       devices=(status.get("memory") or {}).get("devices") or [],
                                       in_flight=node.in_flight[daemon],
                                       row_is_fresh=node.status_at > node.call_ended_at.get(
                                           daemon, 0.0)))
        return found

    def serving(self, daemon: str) -> list[Node]:
        """Every node (in any state) whose broker runs the daemon."""
        return [node for node in self.nodes.values() if daemon in node.daemons]

    def rows(self) -> list[dict]:
        rows = []
        for node in sorted(self.nodes.values(), key=lambda node: node.info.name):
            published = node.published or {}
            broker = (published.get("status") or {}).get("broker") or {}
            rows.append({
                "node": node.info.name, "node_id": node.info.node_id,
                "address": node.info.address, "gpus": node.info.gpus,
                "labels": sorted(node.info.labels), "state": node.state.value,
                "since": node.since, "daemons": list(node.daemons),
                "agent_pid": published.get("agent_pid"), "node_pid": published.get("node_pid"),
                "broker_pid": broker.get("pid"), "dashboard": broker.get("http"),
                "runtime_dir": published.get("runtime_dir"), "served": node.served,
                "problem": node.reason if node.state is NodeState.LOST
                else published.get("problem"),
                "log_tail": published.get("log_tail") if node.state is not NodeState.UP
                else None})
        return rows


def describe_error(exc: BaseException) -> str:
    """One line for an exception; for an error raised inside an actor (RayTaskError, whose
    text is the remote traceback) its last line, which names the error."""
    lines = [line for line in str(exc).strip().split("\n") if line.strip()]
    line = lines[-1].strip() if lines else ""
    text = "{}: {}".format(type(exc).__name__, line) if line else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
