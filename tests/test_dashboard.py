"""The web dashboard in a real headless Chromium, and the Grafana dashboard against the metrics.

Chromium is driven over the Chrome DevTools Protocol on a pipe
(`--remote-debugging-pipe`: JSON messages, each ended by a NUL byte, on the
browser's file descriptors 3 and 4), so the test needs no Python package,
no chromedriver and no websocket client: only Debian's `chromium`. Without
it, the browser test skips.
"""

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import modelhost

from conftest import ROOT, daemon_yaml

GRAFANA_DASHBOARD = ROOT / "config" / "grafana-dashboard.json"


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium(object):
    """A headless Chromium and one page in it, spoken to over CDP on a pipe."""

    def __init__(self, executable, width=1280, height=1000):
        self.profile = tempfile.mkdtemp(prefix="mh-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        args = [executable, "--headless", "--remote-debugging-pipe",
                "--user-data-dir=" + self.profile, "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-extensions", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--window-size={},{}".format(width, height)]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.log_path = os.path.join(self.profile, "chromium.log")
        self._log = open(self.log_path, "wb")
        # Chromium reads commands on fd 3 and writes replies on fd 4: sh puts the pipes there.
        self.process = subprocess.Popen(
            ["sh", "-c", 'exec 3<&0 4>&1 </dev/null >&2; exec "$@"', "sh"] + args
            + ["about:blank"],
            stdin=to_browser_read, stdout=from_browser_write, stderr=self._log)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._last_id = 0
        self._buffer = b""
        self.events = []  # CDP events (messages without an id), in order
        page = next(target for target in self.send("Target.getTargets")["targetInfos"]
                    if target["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"],
                                 flatten=True)["sessionId"]
        self.page("Page.enable")
        self.page("Runtime.enable")
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def send(self, method, session=None, timeout=30.0, **params):
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw.decode())
                if "id" not in reply:
                    self.events.append(reply)
                elif reply["id"] == self._last_id:
                    if "error" in reply:
                        raise RuntimeError("{}: {}".format(method, reply["error"]))
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer {} in {} s".format(method, timeout))
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium exited with {}:\n{}".format(
                    self.process.wait(), self.log()))
            self._buffer += chunk

    def page(self, method, **params):
        return self.send(method, session=self.session, **params)

    def evaluate(self, expression):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError("{}: {}".format(expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30.0, what=None):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for {}; the page says:\n{}".format(
                    what or expression, self.evaluate("document.body && document.body.innerText")))
            time.sleep(0.1)

    def exceptions(self):
        return [event["params"]["exceptionDetails"] for event in self.events
                if event.get("method") == "Runtime.exceptionThrown"]

    def screenshot(self, path):
        data = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(data["data"]))
        return path

    def log(self):
        return Path(self.log_path).read_text(errors="replace")[-4000:]

    def close(self):
        try:
            self.send("Browser.close", timeout=5.0)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def chromium():
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    browser = Chromium(executable)
    yield browser
    browser.close()


def memory_daemon(name, **settings):
    """A daemon that really holds 160 MiB when resident (tests/engines/memory_engine.py)."""
    return daemon_yaml(name, engine="memory_engine:MemoryEngine", options="{resident_mib: 160}",
                       memory="{resident: 240MiB, peak: 60MiB}", **settings)


@pytest.mark.slow
def test_the_dashboard_draws_live_memory_daemon_states_and_evictions(make_host, chromium,
                                                                     tmp_path):
    # Two of the three fit under the threshold: calling the third evicts one.
    host = make_host(
        [memory_daemon("alpha"), memory_daemon("beta"), memory_daemon("gamma", preload="false")],
        {"http": '"127.0.0.1:0"',
         "memory": "{probe: host, threshold: 600MiB, external: ignore, sample_s: 0.05}"}).start()
    status = host.wait_for(lambda status: all(
        d["state"] in ("ready", "unloaded", "offloaded") for d in status["daemons"]),
        what="daemons to register and preload")
    url = status["broker"]["http"]
    assert re.match(r"^http://127\.0\.0\.1:\d+/$", url), url
    names = [d["name"] for d in status["daemons"]]

    chromium.page("Page.navigate", url=url)
    chromium.wait_for("document.title === 'modelhost'", what="the page to load")
    samples_js = ("Number(document.querySelector('#charts canvas[data-drawn=\"1\"]')"
                  "?.dataset.samples)")
    first = chromium.wait_for(samples_js, what="the chart to be drawn from live data")

    # With the page open: calls, and the evictions they cause, show up live.
    client = host.client()
    for name in ("alpha", "beta", "gamma", "alpha"):
        result = client.call(name, "work", seconds=0.5, peak_mib=20, timeout=60)
        assert result["resident_mib"] == 160
    with pytest.raises(modelhost.ModelhostError):
        client.call("alpha", "no_such_method", timeout=10)
    assert sum(d["evictions"] for d in host.ps()["daemons"]) >= 1
    events = chromium.wait_for(
        "(t => t.includes('eviction') && t.includes('unknown_method') && t)"
        "(document.querySelector('#events').innerText)",
        what="the eviction and the error in the events table")
    assert "resident \u2192" in events and "no_such_method" in events, events
    samples = chromium.wait_for("({0} >= {1}) && {0}".format(samples_js, first + 3),
                                what="the chart to take new samples")
    assert chromium.evaluate("document.body.dataset.drawn") == "1"
    assert int(chromium.evaluate("document.body.dataset.samples")) >= samples
    assert chromium.evaluate("document.body.dataset.connected") == "1"
    assert chromium.evaluate("document.getElementById('banner').hidden") is True
    legend = chromium.evaluate("document.querySelector('#charts .legend').innerText")
    for word in names + ["used", "threshold"]:
        assert word in legend, legend
    # The canvas is not blank: the stacked daemons put colour on it.
    painted = chromium.evaluate("""(() => {
        const c = document.querySelector('#charts canvas');
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let coloured = 0;
        for (let i = 0; i < data.length; i += 4) {
            const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
            if (a > 0 && (Math.max(r, g, b) - Math.min(r, g, b)) > 40) coloured++;
        }
        return coloured;
    })()""")
    assert painted > 500, painted

    # The table shows each daemon's state as ps does (read until both agree: states move).
    table_js = """Object.fromEntries([...document.querySelectorAll('#daemons tbody tr')].map(
        (tr) => [tr.dataset.daemon,
                 [tr.cells[1].innerText.trim(), tr.cells[2].innerText.trim()]]))"""
    deadline = time.monotonic() + 10
    while True:
        shown = chromium.evaluate(table_js)
        expected = {d["name"]: [d["state"], d["tier"] if d["target"] in (None, d["tier"])
                                else "{} \u2192 {}".format(d["tier"], d["target"])]
                    for d in host.ps()["daemons"]}
        if shown == expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert shown == expected
    assert chromium.evaluate("document.querySelector('#daemons caption').innerText").endswith(
        "across 3 daemons.")

    assert chromium.exceptions() == []

    screenshot_dir = Path(os.environ.get("MODELHOST_SCREENSHOT_DIR") or tmp_path)
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    path = chromium.screenshot(screenshot_dir / "dashboard.png")
    print("dashboard screenshot:", path)
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A broker that stops answering is said so, and the page keeps trying.
    host.stop()
    banner = chromium.wait_for(
        "document.body.dataset.connected === '0' && !document.getElementById('banner').hidden"
        " && document.getElementById('banner').innerText", timeout=15,
        what="the disconnected banner")
    assert "Disconnected" in banner and "Retrying" in banner, banner
    assert chromium.exceptions() == []


# --- the Grafana dashboard ------------------------------------------------------------------

METRIC = re.compile(r"\bmodelhost_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def base_name(name):
    """A series name without the suffixes Prometheus adds to counters and histograms."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def grafana_panels(panels):
    for panel in panels:
        yield panel
        yield from grafana_panels(panel.get("panels", []))  # inside collapsed rows


def test_the_grafana_dashboard_queries_only_metrics_the_broker_exports():
    from modelhost.broker.metrics import metric_names

    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

    exported = {base_name(name) for name in metric_names()}
    used = {}
    panels = [p for p in grafana_panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in grafana_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        title = panel["title"]
        assert panel.get("datasource") == datasource, title
        assert panel.get("targets"), title + " has no targets"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target.get("datasource") == datasource, title
            names = METRIC.findall(target["expr"])
            assert names, "{}: {} names no modelhost metric".format(title, target["expr"])
            for name in names:
                used.setdefault(base_name(name), title)
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == datasource, variable["name"]
        for name in METRIC.findall(variable["definition"]):
            used.setdefault(base_name(name), "variable " + variable["name"])
    unknown = {name: title for name, title in used.items() if name not in exported}
    assert not unknown, "metrics the broker does not export (metric: panel): {}".format(unknown)
    # What the issue asks the dashboard to show.
    for name in ["modelhost_device_memory_used_bytes", "modelhost_device_memory_threshold_bytes",
                 "modelhost_daemon_memory_bytes", "modelhost_daemon_tier",
                 "modelhost_daemon_state", "modelhost_daemon_queue_depth",
                 "modelhost_daemon_in_flight", "modelhost_requests",
                 "modelhost_request_queue_seconds",
                 "modelhost_request_run_seconds", "modelhost_evictions",
                 "modelhost_tier_move_seconds", "modelhost_daemon_restarts"]:
        assert name in used, name
