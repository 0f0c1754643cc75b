"""The broker's HTTP side: `/metrics`, the dashboard page and the JSON it reads.

It runs on a thread of its own so that a slow scraper or browser never holds
up routing. It reads only what the loop *publishes* once a second: a status
dict, the memory history and the recent events, each an immutable value that
the loop replaces whole (one reference assignment, atomic in Python). The
server never calls into the scheduler. Loopback only: the configuration
refuses any other address, since nothing here asks who is calling.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("modelhost.broker")

WEB_DIR = Path(__file__).resolve().parent / "web"
HISTORY_S = 600  # what the dashboard's chart can show: the last ten minutes
PUBLISH_S = 1.0  # how often the loop publishes, and the history's resolution


@dataclass(frozen=True)
class Published:
    status: dict | None = None
    history: tuple = ()
    events: tuple = ()


class WebState:
    """What the loop hands to the HTTP thread, and the memory history it keeps for it."""

    interval_s = PUBLISH_S

    def __init__(self):
        self.history: deque[dict] = deque(maxlen=int(HISTORY_S / PUBLISH_S))
        self.published = Published()

    def publish(self, status: dict, events) -> None:
        """On the loop's thread: record a history sample and replace what is served."""
        self.history.append(sample_of(status))
        self.published = Published(status, tuple(self.history), tuple(events))


def sample_of(status: dict) -> dict:
    """One point of the memory chart, from a broker status."""
    return {
        "time": status["time"],
        "devices": {row.get("id") or row.get("name"): {
            "used": row.get("used"), "total": row.get("total"),
            "committed": row.get("committed"), "threshold": row.get("threshold")}
            for row in status["memory"]["devices"]},
        "daemons": {row["name"]: {"memory": row.get("memory_bytes"), "tier": row.get("tier"),
                                  "state": row.get("state"), "device": row.get("device")}
                    for row in status["daemons"]},
    }


class WebServer:
    def __init__(self, address: tuple[str, int], state: WebState, metrics: Metrics):
        self.state = state
        self.metrics = metrics
        handler = type("Handler", (_Handler,), {"server_state": self})
        # Binding happens here, on the caller's thread, so a taken port is
        # known at start and reported.
        self.httpd = ThreadingHTTPServer(address, handler)
        self.httpd.daemon_threads = True
        host, port = self.httpd.server_address[:2]
        self.url = "http://{}:{}/".format("[{}]".format(host) if ":" in host else host, port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_state: WebServer  # set on the subclass made per server
    server_version = "modelhost"

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        url = urlsplit(self.path)
        published = self.server_state.state.published
        try:
            if url.path == "/metrics":
                self._send(200, self.server_state.metrics.exposition(), CONTENT_TYPE)
            elif url.path == "/api/status":
                if published.status is None:
                    self._json(503, {"error": "the broker has not published its status yet"})
                else:
                    self._json(200, published.status)
            elif url.path == "/api/history":
                self._json(200, {"interval_s": PUBLISH_S, "window_s": HISTORY_S,
                                 "samples": list(published.history)})
            elif url.path == "/api/events":
                after = parse_qs(url.query).get("after", ["0"])[0]
                after = int(after) if after.lstrip("-").isdigit() else 0
                events = [event for event in published.events if event["seq"] > after]
                last = published.events[-1]["seq"] if published.events else 0
                self._json(200, {"events": events, "last": last})
            elif url.path in ("/", "/index.html"):
                self._file("index.html")
            elif url.path.startswith("/static/"):
                self._file(url.path[len("/static/"):])
            else:
                self._json(404, {"error": "no such page: {}".format(url.path)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away mid-answer

    def _file(self, name: str) -> None:
        path = (WEB_DIR / name).resolve()
        # Only files directly in the folder: no `..`, no subdirectories.
        if path.parent != WEB_DIR or not path.is_file():
            self._json(404, {"error": "no such file: {}".format(name)})
            return
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(200, path.read_bytes(), kind)

    def _json(self, code: int, value) -> None:
        # default=str: the status may hold values JSON has no type for (bytes).
        self._send(code, json.dumps(value, default=str).encode(), "application/json")

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        # One line per scrape would drown the broker's log: debug only.
        log.debug("http %s %s", self.address_string(), format % args)
