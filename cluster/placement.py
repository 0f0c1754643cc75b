"""Pure decisions of the cluster mode: which Ray nodes get an agent, which daemons each
node runs, and which node takes a call. No Ray, no sockets, no clock: the router and
the node watcher feed them what they know and act on the answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from modelhost.protocol import DaemonState, Tier

from .settings import ClusterSettings

# Ray's own resources: every other resource of a node is a label of it.
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RAY_PREFIXES = ("node:", "accelerator_type:", "TPU")
_RAY_LABEL_PREFIX = "ray.io/"


@dataclass(frozen=True)
class NodeInfo:
    """A Ray node as the watcher saw it in `ray.nodes()`."""

    node_id: str  # Ray's hex node id
    name: str  # short and stable while the node lives: the id's first 8 hex digits
    address: str  # its IP address
    gpus: int
    labels: frozenset[str]


def node_info(entry: dict) -> NodeInfo:
    """NodeInfo of one entry of `ray.nodes()`."""
    resources = entry.get("Resources") or {}
    labels = {name for name in resources
              if name not in _RAY_RESOURCES and not name.startswith(_RAY_PREFIXES)}
    for key, value in (entry.get("Labels") or {}).items():
        if not key.startswith(_RAY_LABEL_PREFIX):
            labels.add("{}={}".format(key, value))
    node_id = entry["NodeID"]
    return NodeInfo(node_id=node_id, name=node_id[:8], address=entry.get("NodeManagerAddress", "?"),
                    gpus=int(resources.get("GPU", 0)), labels=frozenset(labels))


def wants_agent(node: NodeInfo, settings: ClusterSettings) -> bool:
    """Whether a node gets a modelhost node agent: it has the configured node label,
    or (without one) GPUs."""
    if settings.node_label is not None:
        return settings.node_label in node.labels
    return node.gpus > 0


def plan_daemons(daemons, settings: ClusterSettings, joining: list[NodeInfo],
                 serving: dict[str, frozenset[str]]) -> dict[str, list[str]]:
    """{node name: daemons it runs} for nodes that join, given what the nodes that are
    up already serve. A daemon goes to nodes whose labels it allows until it has its
    replicas, each time to the joining node that runs the fewest daemons so far (then
    by name). So a node that comes back takes again what its loss left short."""
    counts = Counter(name for names in serving.values() for name in names)
    load = {node.name: 0 for node in joining}
    plan: dict[str, list[str]] = {node.name: [] for node in joining}
    for name in daemons:
        rule = settings.rule(name)
        eligible = sorted((node for node in joining if rule.labels <= node.labels),
                          key=lambda node: (load[node.name], node.name))
        for node in eligible:
            if rule.replicas is not None and counts[name] >= rule.replicas:
                break
            plan[node.name].append(name)
            counts[name] += 1
            load[node.name] += 1
    return plan


# --- routing a call ----------------------------------------------------------------------

RESIDENT_STATES = (DaemonState.READY, DaemonState.BUSY)
# On their way to resident: a call there waits for a load already paid for.
RISING_STATES = (DaemonState.LOADING, DaemonState.ONLOADING)
# Cannot take calls now; a node with one is chosen only when no other node has the daemon.
DOWN_STATES = (DaemonState.FAILED, DaemonState.CRASHED, DaemonState.STOPPED)


@dataclass
class Candidate:
    """One up node that runs the daemon, with its row of that node's published status."""

    node: str
    row: dict  # the daemon's `ps` row on that node
    devices: list = field(default_factory=list)  # that node's `ps` device rows
    in_flight: int = 0  # the router's calls to this daemon on this node, not yet answered
    # Whether the row was read after the router's last call there ended: an older row
    # still counts that call as running.
    row_is_fresh: bool = True


def eviction_need(candidate: Candidate) -> int:
    """Bytes the node would have to free on the daemon's device to make it resident:
    0 when it fits beside what is committed there (or nothing is known)."""
    row = candidate.row
    footprint = row.get("footprint") or {}
    measured, declared = footprint.get("measured") or {}, footprint.get("declared") or {}
    resident = measured.get("resident") or declared.get("resident") or 0
    peak = measured.get("peak") or declared.get("peak") or 0
    device = next((d for d in candidate.devices if d.get("id") == row.get("device")), None)
    if device is None or device.get("threshold") is None:
        return 0
    held = row.get("memory_bytes") or 0  # what it holds already (offloaded, unloaded)
    room = device["threshold"] - (device.get("committed") or 0) + held
    return max(0, resident + peak - room)


def _load(candidate: Candidate) -> float:
    row = candidate.row
    busy = candidate.in_flight
    if candidate.row_is_fresh:  # calls of other clients of that broker count too
        busy = max(busy, (row.get("running") or 0) + (row.get("queued") or 0))
    return busy / float(max(1, row.get("concurrency") or 1))


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The node that takes a call: one where the daemon is resident (the least loaded),
    else one where its load is under way, else the one where it fits with the least
    eviction (then the least loaded, then by name). A node where it failed or crashed
    only when there is no other, so that the call gets that node's own error."""
    def rank(candidate: Candidate):
        state = candidate.row.get("state")
        tier = candidate.row.get("tier")
        if state in RESIDENT_STATES and tier in (None, Tier.RESIDENT):
            group = 0
        elif state in RISING_STATES:
            group = 1
        elif state in DOWN_STATES:
            group = 3
        else:
            group = 2
        need = eviction_need(candidate) if group == 2 else 0
        return (group, need, _load(candidate), candidate.node)

    return min(candidates, key=rank) if candidates else None
