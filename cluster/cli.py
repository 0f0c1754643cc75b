"""`modelhost cluster up|ps`: the cluster mode's commands.

Importing this module declares arguments only; Ray and the broker's configuration
parser are imported when a command runs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import sys
import time
from pathlib import Path

from modelhost import local

EXIT_ERROR = 1
EXIT_USAGE = 2

log = logging.getLogger("modelhost.cluster")


def add_commands(commands) -> None:
    """Declare `modelhost cluster up|ps` on the `modelhost` subparsers."""
    parser = commands.add_parser(
        "cluster", help="modelhost on a Ray cluster: a node agent per GPU node, one router")
    sub = parser.add_subparsers(dest="cluster_command", metavar="COMMAND")
    sub.required = True
    up = sub.add_parser(
        "up", help="run the cluster router and a node agent on every GPU node of a Ray cluster",
        description="Connect to a running Ray cluster, start one modelhost node agent per GPU "
                    "node (each runs that node's broker, supervisor and daemons, in their own "
                    "venvs, as `modelhost up` does on one machine) and serve the cluster "
                    "router, a broker-compatible endpoint, in the foreground until Ctrl-C. "
                    "Needs the cluster extra: pip install 'modelhost[cluster]'.")
    up.add_argument("--address", default="auto",
                    help="the Ray cluster: auto (the one this machine belongs to), HOST:PORT of "
                         "its head, or ray://HOST:10001 (Ray Client) (default: auto)")
    up.add_argument("--config", help="configuration file (default: the embedded default); the "
                    "same daemons section every node runs a part of, and a cluster: section")
    up.add_argument("--endpoint", help="where the router listens (default: cluster.frontend, "
                    "else broker.frontend: clients find it where they find a broker)")
    up.add_argument("--no-setup", action="store_true",
                    help="the nodes do not create or update the daemons' venvs first")
    up.add_argument("--ray-logs", action="store_true",
                    help="print the Ray workers' output here too (the agents' own lines)")
    up.set_defaults(handler=cmd_up)
    ps = sub.add_parser("ps", help="the cluster's nodes and the daemons on each")
    ps.add_argument("--endpoint", help="the router's endpoint (default: $MODELHOST_ENDPOINT or "
                    "the runtime dir's socket)")
    ps.add_argument("--config", help="take the endpoint from this configuration file")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.add_argument("--timeout", type=float, default=5.0)
    ps.add_argument("--wait", type=float, metavar="S",
                    help="first wait up to S seconds for the router to answer, every node to "
                         "be up and every daemon to be past its start and load (exit 1 if not)")
    ps.set_defaults(handler=cmd_ps)


def _load(path):
    """(Config, its text, ClusterSettings), or SystemExit with the errors printed."""
    from modelhost.broker.config import ConfigError, default_config_path, load_config

    from .settings import ClusterConfigError, parse_cluster

    try:
        config = load_config(path)
        file = Path(path) if path else default_config_path()
        text = file.read_text(encoding="utf-8")
        settings = parse_cluster(text, str(file), list(config.daemons))
    except (ConfigError, ClusterConfigError) as exc:
        print("modelhost: the configuration is not valid, nothing was started:\n{}".format(exc),
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return config, text, settings


def router_endpoint(config, settings, explicit=None) -> str:
    endpoint = explicit or settings.frontend or config.broker.frontend
    return endpoint.replace("{runtime_dir}", str(config.broker.runtime_dir))


def _endpoint_problem(endpoint: str) -> str | None:
    if endpoint.startswith("ipc://"):
        return None
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            pass
        return ("the cluster router listens on ipc:// or loopback tcp:// only (it has no CURVE "
                "yet), not {}; for other machines run `modelhost gateway` beside it with API "
                "keys".format(endpoint))
    return "expected ipc:// or tcp:// for the router's endpoint, not {}".format(endpoint)


def cmd_up(args) -> int:
    config, text, settings = _load(args.config)
    endpoint = router_endpoint(config, settings, args.endpoint)
    problem = _endpoint_problem(endpoint)
    if problem:
        print("modelhost: " + problem, file=sys.stderr)
        return EXIT_USAGE
    try:
        import ray
    except ImportError:
        print("modelhost: the cluster mode needs Ray: pip install 'modelhost[cluster]'",
              file=sys.stderr)
        return EXIT_ERROR
    local.configure_logging("cluster", config.broker.log_level)
    try:
        ray.init(address=args.address, namespace="modelhost", log_to_driver=args.ray_logs,
                 logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print("modelhost: cannot join the Ray cluster at {}: {} (start it first: ray start "
              "--head on one machine, ray start --address HEAD:6379 on the others)".format(
                  args.address, exc), file=sys.stderr)
        return EXIT_ERROR
    try:
        return asyncio.run(_serve(ray, config, text, settings, endpoint, not args.no_setup))
    finally:
        ray.shutdown()


async def _serve(ray, config, text, settings, endpoint, setup) -> int:
    from .nodes import Nodes
    from .router import Router

    nodes = Nodes(ray, settings, text, str(config.path) if config.path else None,
                  list(config.daemons), setup=setup)
    router = Router(nodes, endpoint, config_path=str(config.path) if config.path else None,
                    client_liveness_s=config.broker.client_liveness_s,
                    max_frame=config.broker.max_payload_bytes + 2**20)
    # The nodes first: a call that comes before their brokers answer waits for them.
    await nodes.discover()
    try:
        router.bind()
    except OSError as exc:
        print("modelhost: cannot listen at {}: {}".format(endpoint, exc), file=sys.stderr)
        return EXIT_ERROR
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log.info("cluster router %s listening at %s; Ctrl-C stops every node's modelhost",
             router.instance, endpoint)
    tasks = [asyncio.ensure_future(nodes.run()), asyncio.ensure_future(router.serve())]
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait(tasks + [waiter], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for task in tasks:
        if task in done and task.exception() is not None:
            log.error("the cluster router stopped on an error", exc_info=task.exception())
            code = EXIT_ERROR
    log.info("stopping: every node's daemons, then the agents")
    for task in tasks + [waiter]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nodes.stop()
    return code


# --- ps ------------------------------------------------------------------------------------


def _ps_endpoint(args) -> str:
    if args.endpoint:
        return args.endpoint
    if args.config:
        config, _, settings = _load(args.config)
        return router_endpoint(config, settings)
    return local.default_endpoint()


def render_nodes(status: dict) -> str:
    from modelhost._cli_status import format_table, render_status

    nodes = status.get("nodes")
    if nodes is None:
        return "{} is a broker, not a cluster router".format(
            (status.get("broker") or {}).get("frontend"))
    now = status.get("time") or time.time()
    columns = [
        ("NODE", lambda n: n["node"]), ("STATE", lambda n: n["state"]),
        ("FOR", lambda n: "{:.0f}s".format(max(0.0, now - n["since"]))),
        ("ADDRESS", lambda n: n["address"]), ("GPUS", lambda n: str(n["gpus"])),
        ("AGENT", lambda n: str(n.get("agent_pid") or "-")),
        ("CALLS", lambda n: str(n.get("served", 0))),
        ("DAEMONS", lambda n: ", ".join(n["daemons"]) or "-"),
        ("LABELS", lambda n: ", ".join(n["labels"]) or "-"),
    ]
    lines = [format_table(nodes, columns) if nodes else "no node agents yet"]
    for node in nodes:
        if node.get("problem"):
            lines.append("  {}: {}".format(node["node"], node["problem"]))
    lines.append(render_status(status))
    return "\n".join(lines)


# A daemon in one of these has not settled yet: `ps --wait` waits on.
_UNSETTLED = ("starting", "loading", "onloading")


def settled(status: dict) -> bool:
    nodes = status.get("nodes") or []
    return bool(nodes) and all(node["state"] == "up" for node in nodes) and all(
        row.get("state") not in _UNSETTLED for row in status.get("daemons") or [])


def cmd_ps(args) -> int:
    from modelhost import Client
    from modelhost.errors import ModelhostError

    deadline = time.monotonic() + (args.wait or 0.0)
    with Client(_ps_endpoint(args)) as client:
        while True:
            try:
                status = client.ps(timeout=args.timeout)
                if not args.wait or settled(status):
                    break
            except ModelhostError:
                if time.monotonic() > deadline:
                    raise
                status = None
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(render_nodes(status))
    if args.wait and not settled(status):
        print("modelhost: the cluster did not settle within {:.0f}s".format(args.wait),
              file=sys.stderr)
        return EXIT_ERROR
    return 0
