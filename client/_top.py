"""`modelhost top`: the broker's status (what `Client.ps()` returns) as a live view.

The render functions are pure: a status dict in, rich renderables out, so they
can be tested on real status dicts without a terminal. Only `modelhost top`
imports this module, which keeps rich out of the client library (Python 3.7
with pyzmq and msgpack only).
"""

import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

# The sizes and durations read the same as in `modelhost ps`.
from . import _format
from ._client import Client
from .errors import BrokerUnavailable, ModelhostError

BAR_WIDTH = 20
ERROR_WIDTH = 40

STATE_STYLES = {
    "ready": "green", "busy": "bold cyan", "starting": "yellow", "loading": "yellow",
    "onloading": "yellow", "offloading": "yellow", "unloading": "yellow",
    "offloaded": "blue", "unloaded": "dim", "stopped": "dim",
    "failed": "bold red", "crashed": "bold red",
}


def bar(fraction):
    """ "██████░░░░  31%": a text bar, so that it reads the same with or without colour."""
    if fraction is None:
        return Text("-")
    filled = min(BAR_WIDTH, max(0, int(round(fraction * BAR_WIDTH))))
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "bold red"
    text = Text("█" * filled, style=style)
    text.append("░" * (BAR_WIDTH - filled), style="dim")
    text.append(" {:3.0f}%".format(fraction * 100))
    return text


def device_fraction(device):
    """How full a device is against what the broker admits to: committed (or used, for a
    broker that does not count commitments) of the threshold; of the total without one."""
    threshold = device.get("threshold")
    if threshold:
        numerator = device.get("committed")
        if numerator is None:
            numerator = device.get("used")
        return None if numerator is None else numerator / float(threshold)
    if device.get("total") and device.get("used") is not None:
        return device["used"] / float(device["total"])
    return None


def shorten(text, width=ERROR_WIDTH):
    """The first line of a (multi-line) error, cut to `width` with an ellipsis."""
    line = (text or "").strip().split("\n")[0]
    return line if len(line) <= width else line[:width - 1] + "…"


def header(status, error=None, endpoint=None, seen_at=None, retry_s=None):
    """The broker line, then (when the last fetch failed) why, in red."""
    lines = []
    if status is not None:
        broker = status.get("broker") or {}
        memory = status.get("memory") or {}
        line = Text("broker ", style="bold")
        line.append("pid {}  up {}  ".format(broker.get("pid", "?"),
                                             _format.duration(broker.get("uptime_s"))))
        line.append("probe {}".format(memory.get("probe", "?")), style="bold")
        if memory.get("reason"):
            line.append(" ({})".format(memory["reason"]), style="dim")
        lines.append(line)
        where = "clients at {}".format(broker.get("frontend", "?"))
        if broker.get("http"):
            where += "  dashboard at {}".format(broker["http"])
        lines.append(Text(where, style="dim"))
        if status.get("stop"):
            lines.append(Text("stopped for memory: " + ", ".join(status["stop"]),
                              style="yellow"))
    if error is not None:
        if isinstance(error, BrokerUnavailable):
            message = "broker unreachable: {}".format(error.message)
        else:  # a broker that answers wrongly (another protocol version ...): say what
            message = "no status from the broker: {}".format(error)
        if endpoint and endpoint not in message:
            message += " ({})".format(endpoint)
        lines.append(Text(message, style="bold red"))
        notes = []
        if retry_s is not None:
            notes.append("retrying every {:g}s, Ctrl-C quits".format(retry_s))
        if status is not None and seen_at is not None:
            # The tables below are stale; say how stale rather than blanking them.
            notes.append("the tables below are from {}".format(
                time.strftime("%H:%M:%S", time.localtime(seen_at))))
        if notes:
            lines.append(Text("; ".join(notes), style="red"))
    return Group(*lines)


def devices_table(status):
    table = Table(title="devices", title_justify="left", expand=False)
    for name in ("DEVICE", "USED", "COMMITTED", "THRESHOLD", "TOTAL", "EXTERNAL"):
        table.add_column(name, justify="left" if name == "DEVICE" else "right", no_wrap=True)
    table.add_column("OF THRESHOLD", no_wrap=True)
    for device in (status.get("memory") or {}).get("devices") or []:
        external = _format.size(device.get("external"))
        if device.get("external") is not None and device.get("external_counted") is False:
            external += " (not counted)"
        threshold = _format.size(device.get("threshold"))
        if device.get("threshold_text"):
            threshold += " ({})".format(device["threshold_text"])
        table.add_row(
            device.get("id") or device.get("name") or "?", _format.size(device.get("used")),
            _format.size(device.get("committed")), threshold, _format.size(device.get("total")),
            external,
            bar(device_fraction(device)))
    return table


def daemons_table(status):
    table = Table(title="daemons", title_justify="left", expand=False)
    for name in ("NAME", "STATE", "TIER", "DEV", "MEM", "RESIDENT", "PEAK", "QUEUED", "RUN",
                 "RESTARTS", "PINNED", "TTL"):
        # No wrapping: a name or a state cut in two is harder to read than a narrower
        # last-error column.
        table.add_column(name, no_wrap=True)
    table.add_column("LAST ERROR", overflow="ellipsis", no_wrap=True)
    for row in status.get("daemons") or []:
        state = row.get("state") or "-"
        ttl = "-" if row.get("ttl_s") is None else _format.countdown(row["ttl_s"])
        table.add_row(
            str(row.get("name", "?")), Text(state, style=STATE_STYLES.get(state, "")),
            row.get("tier") or "-", row.get("device") or "-",
            _format.short_size(row.get("memory_bytes")),
            _format.footprint(row, "resident"), _format.footprint(row, "peak"),
            str(row.get("queued", 0)),
            "{}/{}".format(row.get("running", 0), row.get("concurrency", "-")),
            str(row.get("restarts", 0)), "yes" if row.get("pinned") else "",
            ttl, Text(shorten(row.get("last_error")), style="red"))
    return table


def queues_table(status):
    """Only the daemons with calls waiting or running: a quiet host shows one line."""
    rows = [row for row in status.get("daemons") or []
            if row.get("queued") or row.get("running")]
    if not rows:
        return Text("queues: no calls waiting or running", style="dim")
    table = Table(title="queues", title_justify="left", expand=False)
    for name in ("NAME", "RUNNING", "QUEUED", "OF MAX QUEUE"):
        table.add_column(name, no_wrap=True)
    for row in rows:
        max_queue = row.get("max_queue")
        table.add_row(
            str(row.get("name", "?")),
            "{}/{}".format(row.get("running", 0), row.get("concurrency", "-")),
            "{}/{}".format(row.get("queued", 0), max_queue or "-"),
            bar(row.get("queued", 0) / float(max_queue) if max_queue else None))
    return table


def render(status, error=None, endpoint=None, seen_at=None, retry_s=None):
    """One frame of `modelhost top`: the last status seen (None: none yet) and, when the
    latest fetch failed, why."""
    parts = [header(status, error, endpoint, seen_at, retry_s)]
    if status is not None:
        parts += [devices_table(status), daemons_table(status), queues_table(status)]
    return Group(*parts)


class Poller(object):
    """Fetches the status once per frame, keeping the last good one across failures."""

    def __init__(self, endpoint, timeout):
        self.endpoint = endpoint
        self.timeout = timeout
        self.client = None
        self.status = None
        self.seen_at = None
        self.error = None

    def poll(self):
        if self.client is None:
            self.client = Client(self.endpoint)
        try:
            self.status = self.client.ps(timeout=self.timeout)
            self.seen_at = time.time()
            self.error = None
        except ModelhostError as exc:
            self.error = exc
            # A fresh socket next time: the old one may hold requests queued for a
            # broker that is gone, which would pile up over a long outage.
            self.close()
        return self.error is None

    def close(self):
        if self.client is not None:
            self.client.close()
            self.client = None

    def frame(self, retry_s=None):
        return render(self.status, self.error, self.endpoint, self.seen_at, retry_s)


def run(endpoint, interval, timeout, console=None):
    """`modelhost top`: refresh in place on a terminal until Ctrl-C (exit 0); elsewhere
    print one frame and return 0, or 1 when the broker did not answer."""
    console = console or Console()
    poller = Poller(endpoint, timeout)
    try:
        if not console.is_terminal:
            # A pipe or a file has no width; rich would assume 80 columns (or COLUMNS,
            # which some environments set to 80 for children) and cut the daemons table.
            console.width = max(console.width, 160)
            ok = poller.poll()
            console.print(poller.frame())
            if not ok:
                console.file.flush()  # the frame first, then why it failed
                print("modelhost: {}".format(poller.error), file=sys.stderr)
            return 0 if ok else 1
        # auto_refresh off: the view changes only when a new status arrives, so a
        # redraw per poll is all it needs (and no refresh thread races the update).
        with Live(console=console, auto_refresh=False) as live:
            while True:
                started = time.monotonic()
                poller.poll()
                live.update(poller.frame(retry_s=interval), refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        poller.close()
