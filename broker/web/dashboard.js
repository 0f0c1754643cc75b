// The modelhost dashboard: polls the broker's JSON API and draws what it says.
// No framework and no build step; the broker serves this file as it is.
"use strict";

(function () {
  const POLL_MS = 1000;
  const FETCH_TIMEOUT_MS = 3000;
  const MAX_EVENTS = 50;
  const GiB = 2 ** 30;
  const MiB = 2 ** 20;
  const KiB = 2 ** 10;
  // Okabe-Ito and friends: distinguishable with the common colour blindnesses.
  const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
                   "#8c6d1f", "#6a3d9a", "#999933", "#b15928"];
  const USED_COLOR = "#1a1a1a";
  const COMMITTED_COLOR = "#5c5c5c";
  const THRESHOLD_COLOR = "#c0002a";

  const view = {
    status: null,
    instance: null,        // the broker instance the samples and events come from
    samples: [],           // history samples, oldest first
    windowS: 600,
    eventsAfter: 0,
    events: [],            // the shown ones, newest first
    colors: new Map(),     // daemon name -> colour, stable while the page lives
    lastContact: null,
    needHistory: true,
  };

  // --- fetching -------------------------------------------------------------

  async function getJSON(path) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch(path, {cache: "no-store", signal: controller.signal});
      if (!response.ok) throw new Error(path + ": HTTP " + response.status);
      return await response.json();
    } finally {
      clearTimeout(timer);
    }
  }

  async function poll() {
    try {
      const status = await getJSON("api/status");
      if (status.broker && status.broker.instance !== view.instance) {
        // A new broker: its event numbers start again and its history is its own.
        view.instance = status.broker.instance;
        view.eventsAfter = 0;
        view.needHistory = true;
      }
      if (view.needHistory) await loadHistory();
      const events = await getJSON("api/events?after=" + view.eventsAfter);
      setConnected(true);
      view.status = status;
      appendSample(status);
      takeEvents(events);
      render();
    } catch (error) {
      setConnected(false, error);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  async function loadHistory() {
    try {
      const history = await getJSON("api/history");
      view.samples = history.samples || [];
      view.windowS = history.window_s || view.windowS;
      view.needHistory = false;
    } catch (error) {
      // Without history the chart still fills from the status, one sample a poll.
      if (!(error instanceof Error && /HTTP/.test(error.message))) throw error;
      view.needHistory = false;
    }
  }

  // The status carries the same figures as a history sample; appending them
  // keeps the chart live without fetching the whole history every second.
  function appendSample(status) {
    if (typeof status.time !== "number") return;
    const last = view.samples[view.samples.length - 1];
    if (last && status.time < last.time + 0.5) return;
    const devices = {};
    for (const row of (status.memory && status.memory.devices) || []) {
      devices[row.id] = {used: row.used, total: row.total,
                         committed: row.committed ?? null, threshold: row.threshold ?? null};
    }
    const daemons = {};
    for (const row of status.daemons || []) {
      daemons[row.name] = {memory: row.memory_bytes ?? null, tier: row.tier, state: row.state};
    }
    view.samples.push({time: status.time, devices, daemons});
    const oldest = status.time - view.windowS;
    while (view.samples.length && view.samples[0].time < oldest) view.samples.shift();
  }

  function takeEvents(reply) {
    if (typeof reply.last === "number") view.eventsAfter = reply.last;
    for (const event of reply.events || []) {
      if ((event.kind === "move" && event.eviction) || event.kind === "error"
          || event.level === "error") {
        view.events.unshift(event);
      }
    }
    view.events.length = Math.min(view.events.length, MAX_EVENTS);
  }

  function setConnected(connected, error) {
    const banner = document.getElementById("banner");
    document.body.dataset.connected = connected ? "1" : "0";
    if (connected) {
      view.lastContact = new Date();
      banner.hidden = true;
      return;
    }
    // Whatever comes back may be a new broker, or have missed samples meanwhile.
    view.needHistory = true;
    const since = view.lastContact
      ? " Last contact at " + view.lastContact.toLocaleTimeString([], {hour12: false}) + "."
      : "";
    banner.textContent = "Disconnected: the broker at " + location.host
      + " is not answering (" + describeError(error) + "). Retrying every second." + since;
    banner.hidden = false;
  }

  function describeError(error) {
    if (error && error.name === "AbortError") return "no answer within "
      + FETCH_TIMEOUT_MS / 1000 + " s";
    return error && error.message ? error.message : String(error);
  }

  // --- formatting -----------------------------------------------------------

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined) return "\u2014";
    if (bytes >= GiB) return (bytes / GiB).toFixed(bytes >= 100 * GiB ? 0 : 2) + " GiB";
    if (bytes >= MiB) return (bytes / MiB).toFixed(0) + " MiB";
    return (bytes / KiB).toFixed(0) + " KiB";
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined) return "\u2014";
    seconds = Math.floor(seconds);
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
    const m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function clock(unix) {
    return new Date(unix * 1000).toLocaleTimeString([], {hour12: false});
  }

  function element(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function colorOf(name) {
    if (!view.colors.has(name)) view.colors.set(name, PALETTE[view.colors.size % PALETTE.length]);
    return view.colors.get(name);
  }

  // --- rendering ------------------------------------------------------------

  function render() {
    const status = view.status;
    for (const row of status.daemons) colorOf(row.name);  // configuration order
    renderBroker(status);
    renderDaemons(status);
    renderEvents();
    renderCharts(status);
  }

  function renderBroker(status) {
    const broker = status.broker || {}, memory = status.memory || {};
    const parts = ["broker pid " + broker.pid, "up " + formatDuration(broker.uptime_s),
                   "memory probe: " + memory.probe
                     + (memory.reason ? " \u2014 " + memory.reason : ""),
                   "clients at " + broker.frontend];
    document.getElementById("broker").textContent = parts.join(" \u00b7 ");
  }

  const STATE_CLASS = {
    ready: "ok", busy: "ok",
    starting: "moving", loading: "moving", onloading: "moving", offloading: "moving",
    unloading: "moving",
    offloaded: "idle", unloaded: "idle", stopped: "idle",
    failed: "bad", crashed: "bad",
  };

  function renderDaemons(status) {
    const body = document.querySelector("#daemons tbody");
    const rows = status.daemons.map((d) => {
      const name = element("th", {scope: "row"},
        element("span", {class: "swatch", style: "background:" + colorOf(d.name),
                         "aria-hidden": "true"}),
        d.name, d.pinned ? element("span", {class: "tag"}, "pinned") : null);
      const tier = d.target && d.target !== d.tier ? d.tier + " \u2192 " + d.target : d.tier;
      return element("tr", {"data-daemon": d.name},
        name,
        element("td", {}, element("span", {class: "state " + (STATE_CLASS[d.state] || "")},
                                  d.state)),
        element("td", {}, tier),
        element("td", {}, d.device ?? "\u2014"),
        element("td", {class: "num"}, formatBytes(d.memory_bytes)),
        element("td", {class: "num"}, d.queued),
        element("td", {class: "num"}, d.running + " / " + d.concurrency),
        element("td", {class: "num"}, d.restarts),
        element("td", {class: "num"}, d.evictions ?? 0),
        element("td", {class: "error"}, d.last_error || ""));
    });
    body.replaceChildren(...rows);
    const queued = status.daemons.reduce((sum, d) => sum + (d.queued || 0), 0);
    const running = status.daemons.reduce((sum, d) => sum + (d.running || 0), 0);
    document.getElementById("queues").textContent = queued + " queued and " + running
      + " running across " + status.daemons.length + " daemons.";
  }

  function describeEvent(event) {
    if (event.kind === "move") {
      return ["eviction",
              event.from + " \u2192 " + event.to + ": " + (event.reason || event.cause)];
    }
    if (event.kind === "error") {
      return ["error " + event.code,
              event.message + (event.rid ? " (request " + event.rid + ")" : "")];
    }
    if (event.kind === "state") {
      return [event.state, event.error || event.previous + " \u2192 " + event.state];
    }
    if (event.kind === "moved") return ["move failed", "to " + event.tier];
    if (event.kind === "request") {
      return ["request " + event.outcome, event.method + " " + event.rid];
    }
    return [event.kind, ""];
  }

  function renderEvents() {
    const body = document.querySelector("#events tbody");
    if (!view.events.length) return;
    body.replaceChildren(...view.events.map((event) => {
      const [what, detail] = describeEvent(event);
      return element("tr", {class: event.level === "error" ? "level-error" : null},
        element("td", {}, clock(event.time)),
        element("td", {}, event.daemon ?? "\u2014"),
        element("td", {}, what),
        element("td", {}, detail));
    }));
  }

  function renderCharts(status) {
    const container = document.getElementById("charts");
    const devices = (status.memory && status.memory.devices) || [];
    if (!devices.length || !view.samples.length) return;
    container.querySelector(".empty")?.remove();
    const byDevice = new Map(devices.map((row) => [row.id, []]));
    for (const d of status.daemons) {
      const id = byDevice.has(d.device) ? d.device : devices[0].id;
      byDevice.get(id).push(d.name);
    }
    let total = 0;
    for (const row of devices) {
      let figure = container.querySelector('figure[data-device="' + CSS.escape(row.id) + '"]');
      if (!figure) {
        figure = element("figure", {class: "chart", "data-device": row.id},
          element("figcaption", {}, element("h3", {}, row.name),
                  element("span", {class: "summary"})),
          element("canvas", {role: "img", "data-drawn": "0", "data-samples": "0"}),
          element("ul", {class: "legend"}));
        container.append(figure);
      }
      total = Math.max(total, drawDevice(figure, row, byDevice.get(row.id)));
    }
    for (const figure of container.querySelectorAll("figure")) {
      if (!byDevice.has(figure.dataset.device)) figure.remove();
    }
    document.body.dataset.samples = String(total);
    document.body.dataset.drawn = total > 0 ? "1" : "0";
  }

  // --- the chart --------------------------------------------------------------

  // A step of 1, 2 or 5 times a power of ten that cuts `range` into at most `count` parts.
  function niceStep(range, count) {
    const rough = range / count;
    const power = 10 ** Math.floor(Math.log10(rough));
    for (const factor of [1, 2, 5, 10]) {
      if (factor * power >= rough) return factor * power;
    }
    return 10 * power;
  }

  function drawDevice(figure, row, names) {
    const canvas = figure.querySelector("canvas");
    const latest = view.samples[view.samples.length - 1].time;
    const span = latest - view.samples[0].time;
    // The shortest of these windows that shows all there is, up to the history's.
    const windowS = [30, 60, 120, 300, 600].find((s) => s >= span && s <= view.windowS)
      || view.windowS;
    const start = latest - windowS;
    const samples = view.samples.filter((s) => s.time >= start && s.devices[row.id]);

    // Stacked: each daemon on top of the ones before it, in configuration order.
    const stacks = samples.map((s) => {
      let top = 0;
      return names.map((name) => {
        const bottom = top;
        top += (s.daemons[name] && s.daemons[name].memory) || 0;
        return [bottom, top];
      });
    });
    const device = (s) => s.devices[row.id];
    const maxOf = (values) => values.reduce((a, b) => Math.max(a, b || 0), 0);
    const threshold = maxOf(samples.map((s) => device(s).threshold));
    const stacked = maxOf(stacks.map((layers) => (layers.length ? layers.at(-1)[1] : 0)));
    const committed = maxOf(samples.map((s) => device(s).committed));
    const used = maxOf(samples.map((s) => device(s).used));
    // Without a GPU the device is the host's RAM, whose "used" is the whole
    // machine's: when it dwarfs the threshold, the daemons stay readable and
    // the used line runs off the top (the legend says so).
    let top = Math.max(threshold, stacked, committed);
    const usedOffScale = top > 0 && used > 2 * top;
    if (!usedOffScale) top = Math.max(top, used);
    top = Math.max(top * 1.1, MiB);
    const unit = top >= 2 * GiB ? GiB : MiB;
    const unitName = unit === GiB ? "GiB" : "MiB";
    const step = niceStep(top / unit, 5) * unit;
    top = Math.ceil(top / step) * step;

    // Sized in CSS pixels, drawn at the screen's resolution.
    const width = Math.max(320, canvas.clientWidth || 640), height = 260;
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 62, right = 12, topMargin = 22, bottom = 34;
    const plotW = width - left - right, plotH = height - topMargin - bottom;
    const x = (t) => left + (t - start) / windowS * plotW;
    const y = (bytes) => topMargin + plotH - Math.min(bytes, top) / top * plotH;

    ctx.font = "12px system-ui, sans-serif";
    ctx.fillStyle = "#333";
    ctx.strokeStyle = "#d9d9d9";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let value = 0; value <= top + 1; value += step) {
      const yy = Math.round(y(value)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + plotW, yy); ctx.stroke();
      const digits = step / unit < 1 ? 1 : 0;
      ctx.fillText((value / unit).toFixed(digits), left - 6, yy);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(unitName, 4, 14);
    const tickS = [10, 15, 30, 60, 120, 300, 600].find((s) => windowS / s <= 6) || 600;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let ago = 0; ago <= windowS; ago += tickS) {
      const xx = Math.round(x(latest - ago)) + 0.5;
      ctx.beginPath(); ctx.moveTo(xx, topMargin); ctx.lineTo(xx, topMargin + plotH); ctx.stroke();
      const label = ago === 0 ? "now" : ago % 60 === 0 ? "\u2212" + ago / 60 + " min"
        : "\u2212" + ago + " s";
      ctx.textAlign = ago === windowS ? "left" : ago === 0 ? "right" : "center";
      ctx.fillText(label, xx, topMargin + plotH + 6);
    }

    ctx.save();
    ctx.beginPath();
    ctx.rect(left, topMargin, plotW, plotH);
    ctx.clip();
    names.forEach((name, i) => {
      if (!samples.length) return;
      ctx.beginPath();
      samples.forEach((s, j) => ctx.lineTo(x(s.time), y(stacks[j][i][1])));
      for (let j = samples.length - 1; j >= 0; j--) {
        ctx.lineTo(x(samples[j].time), y(stacks[j][i][0]));
      }
      ctx.closePath();
      ctx.globalAlpha = 0.45;
      ctx.fillStyle = colorOf(name);
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.beginPath();
      samples.forEach((s, j) => ctx.lineTo(x(s.time), y(stacks[j][i][1])));
      ctx.strokeStyle = colorOf(name);
      ctx.lineWidth = 1.5;
      ctx.stroke();
    });
    const line = (value, color, width, dash) => {
      const points = samples.filter((s) => typeof value(s) === "number");
      if (!points.length) return;
      ctx.beginPath();
      points.forEach((s) => ctx.lineTo(x(s.time), y(value(s))));
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.setLineDash(dash);
      ctx.stroke();
      ctx.setLineDash([]);
    };
    line((s) => device(s).committed, COMMITTED_COLOR, 1.5, [2, 3]);
    if (!usedOffScale) line((s) => device(s).used, USED_COLOR, 2, []);
    line((s) => device(s).threshold, THRESHOLD_COLOR, 2, [7, 5]);
    // Evictions of this device's daemons: a mark at the top, in the daemon's colour.
    const evictions = view.events.filter((e) => e.kind === "move" && e.time >= start
                                                && names.includes(e.daemon));
    for (const event of evictions) {
      const xx = x(event.time);
      ctx.beginPath();
      ctx.moveTo(xx - 6, topMargin);
      ctx.lineTo(xx + 6, topMargin);
      ctx.lineTo(xx, topMargin + 10);
      ctx.closePath();
      ctx.fillStyle = colorOf(event.daemon);
      ctx.fill();
      ctx.strokeStyle = USED_COLOR;
      ctx.lineWidth = 1;
      ctx.stroke();
    }
    ctx.restore();
    ctx.strokeStyle = "#767676";
    ctx.lineWidth = 1;
    ctx.strokeRect(left + 0.5, topMargin + 0.5, plotW - 1, plotH - 1);

    const now = samples[samples.length - 1];
    const current = now ? device(now) : row;
    const legend = names.map((name) => legendItem(
      {class: "swatch", style: "background:" + colorOf(name)}, name,
      formatBytes(now && now.daemons[name] ? now.daemons[name].memory : null)));
    legend.push(legendItem({class: "line used"}, "used",
      formatBytes(current.used) + (usedOffScale ? " (off the scale)" : "")));
    if (typeof current.committed === "number") {
      legend.push(legendItem({class: "line committed"}, "committed",
                             formatBytes(current.committed)));
    }
    if (typeof current.threshold === "number") {
      legend.push(legendItem({class: "line threshold"}, "threshold",
                             formatBytes(current.threshold)));
    }
    if (evictions.length) {
      legend.push(legendItem({class: "mark"}, "eviction", evictions.length + " shown"));
    }
    figure.querySelector(".legend").replaceChildren(...legend);
    figure.querySelector(".summary").textContent = formatBytes(current.used) + " used of "
      + formatBytes(current.total) + (typeof current.threshold === "number"
        ? "; threshold " + formatBytes(current.threshold) : "; no threshold");
    canvas.setAttribute("aria-label", "Memory on " + row.name + " over the last "
      + Math.round(windowS / 60) + " minutes: " + legend.map((li) => li.textContent).join("; "));
    canvas.dataset.samples = String(samples.length);
    canvas.dataset.drawn = samples.length ? "1" : "0";
    return samples.length;
  }

  function legendItem(swatch, name, value) {
    return element("li", {}, element("span", Object.assign({"aria-hidden": "true"}, swatch)),
                   element("span", {class: "name"}, name), " ",
                   element("span", {class: "value"}, value));
  }

  window.addEventListener("resize", () => { if (view.status) renderCharts(view.status); });
  poll();
})();
