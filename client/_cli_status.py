"""The `modelhost` commands that show and steer the broker: ps (and ps --watch), events,
top, and the memory verbs load, unload, pin, unpin. `render_status` is what `ps`
prints for a status; `modelhost top` (client/_top.py, rich) draws the same status live.
"""

import json
import sys
import time

from . import _format, protocol
from ._cli_common import EXIT_ERROR, EXIT_USAGE, client_options, endpoint_of, positive
from ._client import Client
from .errors import ModelhostError

# --- ps ------------------------------------------------------------------------

# Keep the table within this many columns for ordinary rows (the last error
# may run past it); wider terminals can ask for every column with --wide.
TABLE_WIDTH = 120


def format_table(rows, columns):
    """Plain aligned columns, the last one left unpadded."""
    cells = [[str(column[0]) for column in columns]]
    for row in rows:
        cells.append([column[1](row) for column in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        padded = [value.ljust(width) for value, width in zip(line[:-1], widths)]
        lines.append("  ".join(padded + [line[-1]]).rstrip())
    return "\n".join(lines)


def _ttl(row):
    if row.get("pinned"):
        return "pinned"
    if row.get("ttl_s") is None:
        return "-"
    return _format.countdown(row["ttl_s"])


def _last_error(row):
    return (row.get("last_error") or "").split("\n")[0][:80]


# (header, cell of a row, shown by default); DEV shows by default where there
# is more than one device to tell apart.
PS_COLUMNS = [
    ("NAME", lambda d: str(d.get("name", "?")), True),
    ("STATE", lambda d: d.get("state") or "-", True),
    ("TIER", lambda d: d.get("tier") or "-", True),
    ("DEV", lambda d: d.get("device") or "-", False),
    ("PID", lambda d: str(d.get("pid") or "-"), True),
    ("PYTHON", lambda d: d.get("python") or "-", True),
    ("UPTIME", lambda d: _format.duration(d.get("uptime_s")), False),
    ("MEM", lambda d: _format.size(d.get("memory_bytes")), True),
    ("RESIDENT", lambda d: _format.footprint(d, "resident"), True),
    ("PEAK", lambda d: _format.footprint(d, "peak"), True),
    ("TTL", _ttl, True),
    ("RUN", lambda d: "{}/{}".format(d.get("running", 0), d.get("concurrency", "-")), True),
    ("QUEUE", lambda d: "{}/{}".format(d.get("queued", 0), d.get("max_queue", "-")), True),
    ("LOADS", lambda d: str(d.get("loads", 0)), False),
    ("EVICTIONS", lambda d: str(d.get("evictions", 0)), False),
    ("RESTARTS", lambda d: str(d.get("restarts", 0)), False),
    ("LAST ERROR", _last_error, True),
]


def _wrap(parts, width=TABLE_WIDTH, indent="    "):
    """Join parts with ", ", starting a new (indented) line where one would overflow."""
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) > width:
            lines[-1] += ","
            lines.append(indent + part)
        else:
            lines[-1] += ", " + part
    return "\n".join(lines)


def device_line(device, width=TABLE_WIDTH):
    """One device: "gpu0 (NVIDIA H100): used 41.2 / 79.6 GiB, committed 38.0 GiB of threshold
    71.6 GiB (90% of 79.6 GiB), external 1.1 GiB", from whatever fields the broker sent."""
    device_id, name = device.get("id"), device.get("name") or "?"
    label = name if not device_id or name.startswith(device_id) else "{} ({})".format(
        device_id, name)
    total = device.get("total") or 0
    parts = []
    if device.get("used") is not None:
        parts.append("used " + _format.sizes_of([device["used"], total], total))
    threshold = device.get("threshold")
    if threshold is not None:
        text = device.get("threshold_text")
        budget = "threshold " + _format.size(threshold) + (
            " ({})".format(text) if text and text != _format.size(threshold) else "")
        if device.get("committed") is not None:
            budget = "committed {} of {}".format(_format.size(device["committed"]), budget)
        parts.append(budget)
    elif device.get("free") is not None:
        parts.append("free " + _format.size(device["free"]))  # a broker without thresholds
    if device.get("external") is not None:
        parts.append("external {}{}".format(_format.size(device["external"]), "" if device.get(
            "external_counted", True) else " (not counted)"))
    if not parts:
        return label
    return _wrap(["{}: {}".format(label, parts[0])] + parts[1:], width)


def render_status(status, wide=False):
    """What `modelhost ps` prints for a broker status (the value of a `ps` reply)."""
    lines = []
    broker = status.get("broker") or {}
    lines.append("broker pid {} up {}, clients at {}".format(
        broker.get("pid", "?"), _format.duration(broker.get("uptime_s")),
        broker.get("frontend", "?")))
    memory = status.get("memory") or {}
    devices = memory.get("devices") or []
    if memory:
        probe = "memory (probe: {})".format(memory.get("probe", "?"))
        lines.append(probe + (": " + memory["reason"] if memory.get("reason") else ""))
    for device in devices:
        text = device_line(device, TABLE_WIDTH - 2)
        lines.append("\n".join("  " + line for line in text.split("\n")))
    rows = status.get("daemons") or []
    used_devices = set(row.get("device") for row in rows if row.get("device"))
    several = len(devices) > 1 or len(used_devices) > 1
    columns = [(header, cell) for header, cell, default in PS_COLUMNS
               if wide or default or (header == "DEV" and several)]
    if rows:
        lines.append(format_table(rows, columns))
    else:
        lines.append("no daemons configured")
    return "\n".join(lines)


def cmd_ps(args):
    if args.watch or args.count:
        return cmd_ps_watch(args)
    with Client(endpoint_of(args)) as client:
        status = client.ps(timeout=args.timeout)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(render_status(status, wide=args.wide))
    return 0


def event_line(event):
    """One event for people: time, level, kind, daemon, then its own fields."""
    fields = " ".join("{}={}".format(key, "{:.3f}".format(value) if isinstance(value, float)
                                      else value)
                      for key, value in event.items()
                      if key not in ("seq", "time", "kind", "level", "daemon")
                      and value is not None)
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    return "{}.{:03d} {:<7} {:<7} {} {}".format(
        stamp, int(event["time"] % 1 * 1000), event["level"], event["kind"],
        event.get("daemon") or "-", fields).rstrip()


def cmd_events(args):
    with Client(endpoint_of(args)) as client:
        seen = 0
        try:
            for event in client.events(kinds=args.kind or None, timeout=args.timeout):
                print(json.dumps(event, default=str) if args.json else event_line(event),
                      flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
        except KeyboardInterrupt:
            return 0
    return 0


def cmd_ps_watch(args):
    """The ps table again every --interval seconds: in place on a terminal, frames apart by
    a blank line elsewhere (one JSON line each with --json); until Ctrl-C or --count."""
    endpoint, frames, clear = endpoint_of(args), 0, sys.stdout.isatty() and not args.json
    try:
        while True:
            started = time.monotonic()
            try:
                with Client(endpoint) as client:
                    status = client.ps(timeout=args.timeout)
                text, ok = (json.dumps(status, default=str) if args.json
                            else render_status(status, wide=args.wide)), True
            except ModelhostError as exc:  # keep watching: the broker may come back
                text, ok = "modelhost: {}".format(exc), False
            if clear:
                sys.stdout.write("\033[H\033[2J")  # cursor home, clear the screen
            elif frames and not args.json:
                sys.stdout.write("\n")
            print(text, flush=True)
            frames += 1
            if args.count and frames >= args.count:
                return 0 if ok else EXIT_ERROR
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0


def cmd_top(args):
    try:
        from . import _top  # rich: only here, so the client library runs without it
    except ImportError as exc:
        if (getattr(exc, "name", None) or "").split(".")[0] != "rich":
            raise
        print("modelhost: `modelhost top` needs the rich library: pip install rich (or "
              "pip install 'modelhost[host]')", file=sys.stderr)
        return EXIT_USAGE
    return _top.run(endpoint_of(args), args.interval, args.timeout)


# --- load, unload, pin, unpin ----------------------------------------------------


def describe_row(row):
    """Where a daemon stands: "resident on gpu0, 2.1 GiB"."""
    text = row.get("tier") or row.get("state") or "?"
    if row.get("device"):
        text += " on " + row["device"]
    if row.get("memory_bytes") is not None:
        text += ", " + _format.size(row["memory_bytes"])
    return text


_DONE = {"load": "loaded", "unload": "unloaded", "pin": "pinned", "unpin": "unpinned"}


def memory_op_line(verb, name, row, elapsed=None):
    """The one line a memory verb prints: "tts: resident on gpu0, 2.1 GiB (loaded in 3.2s)"."""
    name = row.get("name") or name
    if verb in ("load", "unload"):
        return "{}: {} ({} in {:.1f}s)".format(name, describe_row(row), _DONE[verb],
                                               elapsed or 0.0)
    line = "{}: {}, {}".format(name, _DONE[verb], describe_row(row))
    if verb == "unpin" and row.get("idle_ttl_s") is not None:
        line += ", unloads after {} idle".format(_format.countdown(row["idle_ttl_s"]))
    return line


# (verb, help, what its --timeout waits for; None: it takes no timeout)
MEMORY_VERBS = (
    ("load", "make a daemon resident (evicting idle ones if needed)",
     "seconds to wait for room and the load (default: no limit)"),
    ("unload", "release a daemon's weights once its calls end",
     "seconds to wait for running calls (default: no limit)"),
    ("pin", "never evict a daemon (until unpin)", None),
    ("unpin", "let a pinned daemon be evicted again", None),
)


def cmd_memory_op(args):
    started = time.monotonic()
    with Client(endpoint_of(args)) as client:
        if args.command == "load":
            row = client.load(args.name, timeout=args.timeout, priority=args.priority)
        elif args.command == "unload":
            row = client.unload(args.name, timeout=args.timeout)
        elif args.command == "pin":
            row = client.pin(args.name)
        else:
            row = client.unpin(args.name)
    row = row if isinstance(row, dict) else {}
    if args.json:
        print(json.dumps(row, indent=2, default=str))
    else:
        print(memory_op_line(args.command, args.name, row, time.monotonic() - started))
    return 0


# --- the parser ----------------------------------------------------------------


def add_commands(sub):
    """Declare these commands on the `modelhost` subparsers."""
    ps = sub.add_parser("ps", help="list the daemons and their state")
    client_options(ps)
    ps.add_argument("--timeout", type=float, default=5.0)
    ps.add_argument("-w", "--wide", action="store_true",
                    help="every column: also device, uptime, loads, evictions, restarts")
    ps.add_argument("--watch", action="store_true",
                    help="print the table again every --interval seconds (in place on a "
                         "terminal) until Ctrl-C")
    ps.add_argument("--interval", type=positive(float), default=1.0, metavar="S",
                    help="seconds between frames of --watch (default 1)")
    ps.add_argument("--count", type=positive(int), metavar="N",
                    help="stop after N frames (implies --watch)")
    ps.set_defaults(handler=cmd_ps)

    events = sub.add_parser(
        "events", help="print the broker's events as they happen: state changes, tier "
        "moves, requests, errors")
    client_options(events)
    events.add_argument("-k", "--kind", action="append", choices=protocol.EVENT_KINDS,
                        help="only this kind (repeatable; default: all)")
    events.add_argument("--count", type=positive(int), metavar="N",
                        help="exit after N events")
    events.add_argument("--timeout", type=positive(float), metavar="S",
                        help="exit after S seconds without an event")
    events.set_defaults(handler=cmd_events)

    top = sub.add_parser(
        "top", help="a live view of devices, daemons and queues",
        description="A live view of the broker's devices, daemons and queues, refreshed in "
                    "place until Ctrl-C; it keeps retrying while the broker is unreachable. "
                    "When stdout is not a terminal it prints one frame and exits (1 when the "
                    "broker did not answer). Needs the rich library (the host extra).")
    top.add_argument("--endpoint", help="the broker's client endpoint (default: "
                     "$MODELHOST_ENDPOINT or the runtime dir's socket)")
    top.add_argument("--config", help="take the endpoint from this configuration file")
    top.add_argument("--interval", type=positive(float), default=1.0, metavar="S",
                     help="seconds between refreshes (default 1)")
    top.add_argument("--timeout", type=positive(float), default=2.0, metavar="S",
                     help="seconds to wait for the broker's answer each refresh (default 2)")
    top.set_defaults(handler=cmd_top)

    for verb, summary, timeout_help in MEMORY_VERBS:
        parser = sub.add_parser(verb, help=summary)
        client_options(parser)
        parser.add_argument("name", metavar="NAME")
        if timeout_help:
            parser.add_argument("--timeout", type=float, help=timeout_help)
        if verb == "load":
            parser.add_argument("--priority", default=protocol.Priority.NORMAL,
                                choices=protocol.Priority.ALL)
        parser.set_defaults(handler=cmd_memory_op)
