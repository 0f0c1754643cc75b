"""The audio drama through modelhost against the exclusive-lock order of the old pipeline.

    python3 bench/drama.py [--quick] [--json FILE] [--keep]

One script (scenes of dialogue, an ambience per scene, effects) is rendered
by modelhost.pipelines.render_drama against two daemons that hold real memory
(bench/engines/drama_engine.py: a TTS and a text-to-audio STAND-IN, each
call a sleep standing in for the model's work, audio made on the spot),
under three broker settings:

  fit      both daemons fit together with their peaks;
  apart    each fits alone, the two together do not: the broker must
           serialize them (its default `max_skips: 4`: at most 4 calls of
           the resident daemon overtake a call waiting for memory);
  apart64  the same with `max_skips: 64`: the resident daemon's queue drains
           before the broker swaps.

and in two orders, each against a fresh `modelhost up`:

  lock       the old pipeline's order: every TTS call, then every
             text-to-audio call, one call at a time (workers=1, by kind);
  together   every item outstanding at once (32 workers), submitted with the
             kinds interleaved, the broker deciding what runs when;
  bykind     every item outstanding at once, submitted in stage order (all
             dialogue, then ambience, then effects): the pipeline's default.

Measured per run: the generation makespan (first submit to last reply), the
whole run (generation, timeline, mix, files), the loads and tier moves, and
the daemons' summed RSS sampled from outside every 20 ms against the
threshold. Everything compared is measured in one run; nothing asserts: the
bench prints its ratios and exits 0.
"""

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy
import psutil
import zmq

import modelhost
from modelhost.pipelines import DramaOptions, render_drama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UpHost  # noqa: E402
from scheduling import Sampler, read_events  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = HERE / "engines"
MiB = 2**20
OFFLOAD_S = 0.3
ONLOAD_S = 0.3
READY_TIMEOUT_S = 120.0

# resident_mib: weights touched on load; a daemon process holds ~40 MiB more
# before it loads anything, which the declared footprints include.
DAEMONS = collections.OrderedDict([
    ("tts", {"what": "TTS", "resident_mib": 200, "load_s": 1.0, "call_s": 0.3,
             "declared": "{resident: 240MiB, peak: 10MiB}"}),
    ("sfx", {"what": "text-to-audio", "resident_mib": 300, "load_s": 2.5, "call_s": 1.2,
             "declared": "{resident: 340MiB, peak: 40MiB}"}),
])
# name -> (threshold, max_skips): the broker's `memory.max_skips` is how many calls of
# a resident daemon may overtake a request waiting for memory (default 4).
CONDITIONS = collections.OrderedDict([("fit", (800, 4)), ("apart", (480, 4)),
                                      ("apart64", (480, 64))])
# name -> (workers, order of submission)
ORDERS = collections.OrderedDict([
    ("lock", (1, "by_kind")),  # the old pipeline: all TTS, then all text-to-audio, one by one
    ("together", (32, "interleaved")),  # every item outstanding at once, the kinds alternating
    ("bykind", (32, "by_kind")),  # every item outstanding at once, in stage order
])
SCRIPTS = {False: {"scenes": 4, "lines": 5, "effects": 2},
           True: {"scenes": 2, "lines": 3, "effects": 1}}


def _version(package):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # Python 3.7, or not installed as a distribution
        return "?"


def log(line):
    print(line, file=sys.stderr, flush=True)


def make_script(shape):
    speakers = ["Ada", "Ben", "Cleo"]
    scenes = []
    for s in range(shape["scenes"]):
        lines = [{"speaker": speakers[(s + i) % 3],
                  "text": "Scene {} line {}: the light is late tonight again".format(s, i)}
                 for i in range(shape["lines"])]
        effects = [{"prompt": "effect {} of scene {}".format(e, s), "line": e % shape["lines"],
                    "anchor": "end", "at": 0.2} for e in range(shape["effects"])]
        scenes.append({"name": "scene {}".format(s),
                       "ambience": {"prompt": "ambience of scene {}".format(s), "duration": 8},
                       "lines": lines, "effects": effects})
    return {"title": "bench drama", "scenes": scenes}


def daemon_yaml(name, spec, events):
    options = {"name": name, "resident_mib": spec["resident_mib"], "load_s": spec["load_s"],
               "offload_s": OFFLOAD_S, "onload_s": ONLOAD_S, "events": str(events),
               "call_s": spec["call_s"]}
    return "\n".join([
        "  {}:".format(name),
        "    engine: drama_engine:DramaEngine",
        "    python: {}".format(json.dumps(sys.executable)),
        "    venv: false",
        "    pythonpath: [{}]".format(json.dumps(str(ENGINES))),
        "    concurrency: 1",
        "    max_queue: 64",
        "    preload: true",
        "    memory: {}".format(spec["declared"]),
        "    options: {{{}}}".format(", ".join("{}: {}".format(k, json.dumps(v))
                                              for k, v in options.items())),
    ]) + "\n"


class Host(UpHost):
    def __init__(self, directory, threshold_mib, max_skips):
        directory = Path(directory)
        self.events = directory / "events.jsonl"
        super().__init__(
            directory,
            ["memory: {{probe: host, threshold: {}MiB, external: ignore, sample_s: 0.05, "
             "max_skips: {}}}".format(threshold_mib, max_skips)],
            [daemon_yaml(name, spec, self.events) for name, spec in DAEMONS.items()])

    def settled(self, client, timeout=READY_TIMEOUT_S, settle_s=1.0):
        deadline = time.monotonic() + timeout
        calm_since, last = None, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("modelhost up exited:\n" + self.log_tail())
            try:
                last = client.ps(timeout=2.0)
            except modelhost.ModelhostError:
                calm_since = None
                time.sleep(0.2)
                continue
            rows = last["daemons"]
            calm = {r["name"] for r in rows} == set(DAEMONS) and all(
                r["pid"] and r["target"] is None
                and r["state"] in ("ready", "unloaded", "offloaded") for r in rows)
            if not calm:
                calm_since = None
            elif calm_since is None:
                calm_since = time.monotonic()
            elif time.monotonic() - calm_since >= settle_s:
                return last
            time.sleep(0.1)
        raise RuntimeError("daemons not settled: {}\n{}".format(last, self.log_tail()))


def run_one(condition, order, script, directory):
    threshold, max_skips = CONDITIONS[condition]
    host = Host(directory, threshold, max_skips)
    host.start()
    sampler = None
    try:
        with modelhost.Client(host.endpoint) as client:
            host.settled(client)
            # Both orders start alike: what fits resident, TTS (the first stage) last.
            if condition == "fit":
                client.load("sfx", timeout=60)
            client.load("tts", timeout=60)
            settled = host.settled(client)
            tiers = {r["name"]: r["tier"] for r in settled["daemons"]}
            baseline = [psutil.Process(r["pid"]).memory_info().rss / MiB
                        for r in settled["daemons"] if r["tier"] == "unloaded"]
            sampler = Sampler(host.endpoint, threshold * MiB)
            sampler.start()
            time.sleep(0.3)
            wall_offset = time.time() - time.monotonic()
            options = DramaOptions(
                endpoint=host.endpoint, tts_model="tts", sfx_model="sfx", use_cache=False,
                workers=ORDERS[order][0], order=ORDERS[order][1])
            started = time.monotonic()
            result = render_drama(script, str(Path(directory) / "drama.wav"), options=options)
            total = time.monotonic() - started
            generate = result.seconds.get("generate", float("nan"))
            sampler.stop()
            status = client.ps(timeout=5.0)
    finally:
        if sampler is not None:
            sampler.stop()
        host.stop()
    moves = read_events(host.events, started + wall_offset,
                        started + generate + wall_offset)
    rows = status["daemons"]
    return {
        "condition": condition, "threshold_mib": threshold, "max_skips": max_skips,
        "order": order,
        "tiers_at_start": tiers, "baseline_mib": baseline,
        "generate_s": generate, "total_s": total, "mix_s": result.seconds.get("mix"),
        "ok": result.ok, "items": result.items, "calls": result.calls,
        "failures": [str(f) for f in result.failures],
        "loads_ps": sum(r["loads"] for r in rows),
        "evictions_ps": sum(r["evictions"] for r in rows),
        "moves": moves["during"], "moves_per_daemon": moves["per_daemon"],
        "memory": sampler.summary(started, started + generate),
        "duration_s": result.duration_s,
    }


def format_table(results):
    lines = ["{:<8} {:<9} {:>9} {:>8} {:>6} {:>6} {:>6} {:>6} {:>7} {:>5} {:>8} {:>7}".format(
        "memory", "order", "generate", "total", "loads", "unlds", "offlds", "onlds", "peak",
        "over", "samples", "failed"),
        "{:<8} {:<9} {:>9} {:>8} {:>6} {:>6} {:>6} {:>6} {:>7} {:>5} {:>8} {:>7}".format(
        "", "", "s", "s", "", "", "", "", "MiB", "", "", "")]
    for r in results:
        m, mv = r["memory"], r["moves"]
        lines.append("{:<8} {:<9} {:>9.1f} {:>8.1f} {:>6} {:>6} {:>6} {:>6} {:>7.0f} {:>5} "
                     "{:>8} {:>7}".format(
                         r["condition"], r["order"], r["generate_s"], r["total_s"],
                         mv.get("load", 0), mv.get("unload", 0), mv.get("offload", 0),
                         mv.get("onload", 0), m["peak_mib"], m["over"], m["samples"],
                         len(r["failures"])))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter script: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import soxr

    shape = SCRIPTS[args.quick]
    script = make_script(shape)
    n_tts = shape["scenes"] * shape["lines"]
    n_sfx = shape["scenes"] * (1 + shape["effects"])
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
              "versions": {"python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
                           "numpy": numpy.__version__, "soxr": soxr.__version__,
                           "pyloudnorm": _version("pyloudnorm"),
                           "modelhost": modelhost.__version__},
              "daemons": DAEMONS, "conditions": CONDITIONS, "script": shape,
              "results": []}
    directory = Path(tempfile.mkdtemp(prefix="mhd-", dir="/tmp"))
    try:
        for condition in CONDITIONS:
            for order in ORDERS:
                log("{} / {} ...".format(condition, order))
                result = run_one(condition, order, script, directory / (condition + "-" + order))
                report["results"].append(result)
                log("  generate {:.1f}s, total {:.1f}s, moves {}".format(
                    result["generate_s"], result["total_s"], result["moves"]))
    finally:
        if args.keep:
            log("kept {}".format(directory))
        else:
            shutil.rmtree(str(directory), ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    results = {(r["condition"], r["order"]): r for r in report["results"]}
    baselines = [b for r in report["results"] for b in r["baseline_mib"]]
    base = sum(baselines) / len(baselines) if baselines else 40.0
    tts, sfx = DAEMONS["tts"], DAEMONS["sfx"]
    both = 2 * base + tts["resident_mib"] + sfx["resident_mib"] + 30
    alone = 2 * base + sfx["resident_mib"] + 30

    v = report["versions"]
    print("modelhost audio-drama bench{} - {}".format(" (--quick)" if args.quick else "",
                                                      report["started"]))
    print("python {python}, pyzmq {pyzmq}, numpy {numpy}, soxr {soxr}, pyloudnorm "
          "{pyloudnorm}".format(**v))
    print("cpus {}, load average at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
          .format(report["cpus"], *(report["loadavg_start"] + report["loadavg_end"])))
    print("")
    print("daemons (stand-ins; bench/engines/drama_engine.py): weights touched on load, "
          "sleeps for loading and for each call; offload/onload {}/{}s".format(OFFLOAD_S,
                                                                              ONLOAD_S))
    for name, spec in DAEMONS.items():
        print("  {:<4} {:<14} {:>4} MiB, load {:.1f}s, call {:.2f}s".format(
            name, spec["what"], spec["resident_mib"], spec["load_s"], spec["call_s"]))
    print("script: {} scenes, {} lines, {} ambiences, {} effects: {} TTS calls and {} "
          "text-to-audio calls, {:.0f}s of work one after another".format(
              shape["scenes"], n_tts, shape["scenes"], shape["scenes"] * shape["effects"],
              n_tts, n_sfx, n_tts * tts["call_s"] + n_sfx * sfx["call_s"]))
    print("memory (summed daemon RSS, {:.0f} MiB per idle process measured): both resident "
          "with a peak ~{:.0f} MiB, the larger alone ~{:.0f} MiB".format(base, both, alone))
    for name, (threshold, max_skips) in CONDITIONS.items():
        print("  {:<8} threshold {} MiB ({}), broker max_skips {}".format(
            name, threshold, "both fit" if both <= threshold else
            "one at a time" if alone <= threshold else "NEITHER FITS", max_skips))
    print("")
    print(format_table(report["results"]))
    print("generate: first submit to last reply; total: render_drama from script to files "
          "(generation, timeline, mix, writing); moves: the engines' own log during "
          "generation; peak, over: summed daemon RSS every 20 ms, samples over the threshold")
    failures = [f for r in report["results"] for f in r["failures"]]
    for failure in failures[:5]:
        print("  failed: {}".format(failure))
    print("")
    print("ratios:")
    ratios = []
    for condition in CONDITIONS:
        lock = results[(condition, "lock")]
        for order in ORDERS:
            if order == "lock":
                continue
            for what in ("generate", "total"):
                value = lock[what + "_s"] / results[(condition, order)][what + "_s"]
                ratios.append({"name": "{} makespan lock/{}, {}".format(what, order,
                                                                     condition),
                               "value": value})
                print("  {} = {:.2f}x".format(ratios[-1]["name"], value))
    over = sum(r["memory"]["over"] for r in report["results"])
    print("  threshold violations, all runs = {}".format(over))
    report["ratios"] = ratios
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
