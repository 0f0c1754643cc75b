"""The `cluster:` section of a modelhost configuration, validated with file:line errors.

    cluster:
      frontend: ipc://{runtime_dir}/cluster.sock   # the router's (default: broker.frontend)
      node_label: gpu-box      # only Ray nodes with this label get a node agent
                               # (default: every node with GPUs)
      status_s: 0.5            # how often the router reads each node's published status
      daemons:
        espeak: {replicas: 2, labels: [tts]}        # on 2 nodes that have the label tts
        asr: {replicas: all}                        # on every node

A node's labels are its Ray custom resources (`ray start --resources '{"tts": 1}'`)
and its Ray node labels as `key=value`. A daemon the section does not name runs on
one node. The broker's configuration parser accepts the section and leaves it to
this module; everything else of the file is the broker's to check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ALL = "all"  # replicas: on every node whose labels allow it
_KEYS = ("frontend", "node_label", "status_s", "daemons")
_DAEMON_KEYS = ("replicas", "labels")
_LABEL = re.compile(r"^[A-Za-z0-9_.:/=-]{1,128}$")


class ClusterConfigError(Exception):
    """A `cluster:` section that cannot be used; one message per problem, with its line."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class DaemonRule:
    """Where one daemon may run and on how many nodes."""

    replicas: int | None = 1  # None: every node its labels allow
    labels: frozenset[str] = frozenset()  # a node must have all of them


@dataclass(frozen=True)
class ClusterSettings:
    frontend: str | None = None  # None: the broker section's frontend
    node_label: str | None = None  # None: every Ray node with GPUs gets an agent
    status_s: float = 0.5
    daemons: dict[str, DaemonRule] = field(default_factory=dict)  # named in the section

    def rule(self, daemon: str) -> DaemonRule:
        return self.daemons.get(daemon, DaemonRule())


def parse_cluster(text: str, label: str, daemon_names) -> ClusterSettings:
    """The `cluster:` section of configuration text (defaults when there is none).

    `label` names the file in errors; `daemon_names` are the daemons the file
    configures (the broker's parser has checked those).
    """
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    section = None
    if isinstance(root, yaml.MappingNode):
        section = next((value for key, value in root.value if key.value == "cluster"), None)
    if section is None or (isinstance(section, yaml.ScalarNode) and section.value in ("", "~",
                                                                                       "null")):
        return ClusterSettings()
    errors: list[tuple[int, str]] = []

    def error(node, key, message):
        line = node.start_mark.line + 1
        errors.append((line, "{}:{}: cluster{}: {}".format(label, line, "." + key if key else "",
                                                          message)))

    fields = _mapping(section, "", _KEYS, error)
    values: dict = {}
    if "frontend" in fields:
        node = fields["frontend"]
        if not _is_str(node) or "://" not in node.value:
            error(node, "frontend", "expected an endpoint like ipc://PATH or tcp://HOST:PORT")
        else:
            values["frontend"] = node.value
    if "node_label" in fields:
        node = fields["node_label"]
        if _is_null(node):
            values["node_label"] = None
        elif not _is_str(node) or not _LABEL.match(node.value):
            error(node, "node_label", "expected a label (a Ray custom resource name, or "
                  "key=value of a Ray node label)")
        else:
            values["node_label"] = node.value
    if "status_s" in fields:
        node = fields["status_s"]
        number = _number(node)
        if number is None or not 0.05 <= number <= 60:
            error(node, "status_s", "expected a number of seconds from 0.05 to 60")
        else:
            values["status_s"] = number
    rules = {}
    if "daemons" in fields:
        known = list(daemon_names)
        entries = _mapping(fields["daemons"], "daemons", None, error)
        for name, node in entries.items():
            where = "daemons." + name
            if name not in known:
                error(node, where, "no daemon of that name in the daemons section (it has: "
                      "{})".format(", ".join(known) or "none"))
                continue
            rule = _rule(node, where, error)
            if rule is not None:
                rules[name] = rule
    if errors:
        # In file order, and for one line in the order found.
        raise ClusterConfigError([message for _, message in sorted(errors, key=lambda e: e[0])])
    return ClusterSettings(daemons=rules, **values)


def _rule(node, where, error) -> DaemonRule | None:
    fields = _mapping(node, where, _DAEMON_KEYS, error)
    replicas, labels = 1, frozenset()
    if "replicas" in fields:
        value = fields["replicas"]
        number = _number(value)
        if _is_str(value) and value.value == ALL:
            replicas = None
        elif number is None or number != int(number) or number < 1:
            error(value, where + ".replicas", "expected a number of nodes (1 or more) or all")
            return None
        else:
            replicas = int(number)
    if "labels" in fields:
        value = fields["labels"]
        items = value.value if hasattr(value, "value") and isinstance(value.value, list) else None
        if items is None or not all(_is_str(item) and _LABEL.match(item.value)
                                    for item in items):
            error(value, where + ".labels", "expected a list of labels, like [tts, gpu-a100]")
            return None
        labels = frozenset(item.value for item in items)
    return DaemonRule(replicas=replicas, labels=labels)


def _mapping(node, where, allowed, error) -> dict:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        error(node, where, "expected a mapping")
        return {}
    fields = {}
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else None
        if allowed is not None and name not in allowed:
            error(key, (where + "." if where else "") + str(name),
                  "unknown key (expected one of: {})".format(", ".join(allowed)))
            continue
        fields[name] = value
    return fields


def _is_str(node) -> bool:
    return getattr(node, "tag", "") == "tag:yaml.org,2002:str"


def _is_null(node) -> bool:
    return getattr(node, "tag", "") == "tag:yaml.org,2002:null"


def _number(node) -> float | None:
    if getattr(node, "tag", "") not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        return None
    try:
        return float(node.value)
    except ValueError:
        return None
