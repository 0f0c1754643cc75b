"""One node's modelhost: its configuration, derived from the cluster's, and its process.

The node agent (a Ray actor) writes the node's configuration with `prepare` and starts
`python -m modelhost.cluster.node --config FILE --parent-pid AGENT`: `modelhost setup`
of the node's daemons (one node at a time where nodes share a filesystem), then
`modelhost up`, whose supervisor starts the broker and the daemons as on one machine.
The process exits when the agent is gone, so a lost agent leaves no daemon holding GPU
memory. This module runs on the node, with the node's own paths.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

NODE_CONFIG = "node-config.yaml"
NODE_LOG = "node.log"
NODE_PID = "node.pid"
PARENT_POLL_S = 0.5


def prepare(config_text: str, config_path: str | None, node: str, daemons: list[str]) -> dict:
    """Write the node's configuration into its own runtime dir; returns its paths.

    The node's configuration is the cluster's with only the node's daemons, no gateway,
    the broker's sockets (ipc) in <runtime_dir>/nodes/NODE and its remembered
    footprints in <state_dir>/nodes/NODE (two nodes on one filesystem must not share
    them), and its dashboard on any free loopback port. Every path is made absolute,
    as the cluster's file resolved it, so that the copy works from anywhere; the
    daemons' venvs stay where that file puts them.
    """
    import yaml
    from modelhost.broker.config import parse_config

    config = parse_config(config_text, Path(config_path) if config_path else None)
    data = yaml.safe_load(config_text) or {}
    runtime_dir = config.broker.runtime_dir / "nodes" / node
    state_dir = config.broker.state_dir / "nodes" / node
    broker = dict(data.get("broker") or {})
    for key in ("frontend", "backend", "events", "curve"):
        broker.pop(key, None)  # ipc in the node's runtime dir: only its agent connects
    broker.update(runtime_dir=str(runtime_dir), state_dir=str(state_dir))
    if config.broker.http is not None:
        broker["http"] = "127.0.0.1:0"
    sections = {}
    for name in daemons:
        daemon = config.daemons[name]
        section = dict(data["daemons"][name])
        section["python"] = daemon.python
        section["venv"] = str(daemon.venv) if daemon.venv is not None else False
        if daemon.requirements is not None:
            section["requirements"] = str(daemon.requirements)
        if daemon.pythonpath:
            section["pythonpath"] = [str(path) for path in daemon.pythonpath]
        sections[name] = section
    text = yaml.safe_dump({"broker": broker, "daemons": sections}, sort_keys=False)
    os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
    path = runtime_dir / NODE_CONFIG
    path.write_text("# modelhost node {}: written by its node agent from {}\n{}".format(
        node, config_path or "the cluster's configuration", text))
    parse_config(path.read_text(), path)  # what the node's broker will read
    return {"config": str(path), "runtime_dir": str(runtime_dir),
            "frontend": "ipc://{}/frontend.sock".format(runtime_dir),
            "log": str(runtime_dir / NODE_LOG), "pidfile": str(runtime_dir / NODE_PID),
            "setup_lock": str(config.broker.state_dir / "cluster-setup.lock")}


def _watch_parent(parent_pid: int) -> None:
    """SIGTERM to this process once the agent is gone: the supervisor then stops the
    broker and the daemons as on Ctrl-C."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    print("modelhost node: the node agent {} is gone; stopping".format(parent_pid),
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelhost.cluster.node")
    parser.add_argument("--config", required=True, help="the node's configuration")
    parser.add_argument("--parent-pid", type=int, required=True,
                        help="the node agent: exit when it is gone")
    parser.add_argument("--setup", action="store_true",
                        help="`modelhost setup` of the node's daemons first")
    parser.add_argument("--setup-lock", help="a file locked while setting up (nodes that "
                        "share a filesystem would otherwise build one venv at once)")
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    from modelhost import cli

    if args.setup:
        with open(args.setup_lock or os.devnull, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # A failed setup shows in ps as that daemon's error; the others start.
            cli.main(["setup", "--config", args.config])
    return cli.main(["up", "--no-setup", "--config", args.config])


if __name__ == "__main__":
    sys.exit(main())
