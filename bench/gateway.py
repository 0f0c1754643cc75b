"""What the OpenAI-compatible gateway adds to a streamed TTS call, measured in one run.

    python3 bench/gateway.py [--calls N] [--quick] [--json FILE]

One real `modelhost up` (supervisor, broker, the real espeak-ng daemon on this
interpreter, and the gateway as its child). The same TTS call on two paths,
interleaved call by call (the order alternating), after a warm-up:

  direct    Client.stream("espeak", "tts", text=..., voice="en-us"): the first
            chunk, then every chunk, through the broker;
  gateway   POST /v1/audio/speech {"model": "tts-1", "voice": "alloy" (en-us),
            "response_format": "pcm"} over one keep-alive HTTP/1.1 connection
            (http.client, so that no HTTP client library is measured): the first
            byte of the body, then the whole body. The gateway's pcm_rate is null
            here, so its bytes are the daemon's own (no resampling).
  openai    the same request through the official openai client's
            with_streaming_response (informative: the SDK's own cost is in it).

Time to first byte (TTFB) and total, p50 and p95 (nearest rank), per text: a
short sentence (one chunk of espeak's 0.25 s) and a longer one (several
chunks). "added" is gateway minus direct at each percentile; the target is
under 2 ms added to the first byte. Nothing here asserts on timings.
"""

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UpHost, percentile  # noqa: E402

import modelhost  # noqa: E402

TEXTS = (
    ("short", "Hello there, how are you today?"),
    ("long", "The quick brown fox jumps over the lazy dog, and then it runs back across the "
             "field to the old stone wall, where it waits for the farmer to come home."),
)
TARGET_ADDED_MS = 2.0
READY_TIMEOUT_S = 120.0


def daemon_section():
    return ("  espeak:\n"
            "    engine: modelhost.daemons.espeak.engine:EspeakEngine\n"
            "    python: {}\n"
            "    venv: false\n"
            "    options: {{voice: en-us}}\n").format(json.dumps(sys.executable))


GATEWAY_SECTION = """gateway:
  listen: 127.0.0.1:0
  pcm_rate: null
  models:
    tts-1: {daemon: espeak, task: speech}
"""


def wait_for_gateway(host):
    path = host.dir / "run" / "gateway-address.json"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if host.process.poll() is not None:
            raise SystemExit("modelhost up exited:\n" + host.log_tail())
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SystemExit("the gateway did not come up:\n" + host.log_tail())


def direct_call(client, text):
    start = time.perf_counter()
    first = None
    size = 0
    for chunk in client.stream("espeak", "tts", text=text, voice="en-us", timeout=60):
        if first is None:
            first = time.perf_counter() - start
        size += len(chunk["audio"])
    return first, time.perf_counter() - start, size


def gateway_call(connection, text):
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": text,
                       "response_format": "pcm"})
    start = time.perf_counter()
    connection.request("POST", "/v1/audio/speech", body=body,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit("the gateway answered {}: {}".format(response.status, response.read()))
    data = response.read1(1 << 20)
    first = time.perf_counter() - start
    size = len(data)
    while True:
        data = response.read1(1 << 20)
        if not data:
            break
        size += len(data)
    return first, time.perf_counter() - start, size


def openai_call(client, text):
    start = time.perf_counter()
    first = None
    size = 0
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=text, response_format="pcm") as response:
        for piece in response.iter_bytes():
            if first is None:
                first = time.perf_counter() - start
            size += len(piece)
    return first, time.perf_counter() - start, size


def summary(values):
    ordered = sorted(values)
    return percentile(ordered, 0.5) * 1000, percentile(ordered, 0.95) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per path and text")
    parser.add_argument("--quick", action="store_true", help="40 calls per path and text")
    parser.add_argument("--no-openai", action="store_true", help="skip the openai client path")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    calls = 40 if args.quick else args.calls
    try:
        import openai
    except ImportError:
        openai = None
    use_openai = openai is not None and not args.no_openai

    directory = Path(tempfile.mkdtemp(prefix="mh-bench-gw-", dir="/tmp"))
    host = UpHost(directory, ["heartbeat_s: 1.0"], [daemon_section()])
    host.config.write_text(host.config.read_text() + GATEWAY_SECTION)
    load_start = os.getloadavg()
    print("modelhost gateway bench - {}".format(time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    versions = ["python {}".format(platform.python_version())]
    for name in ("starlette", "uvicorn", "openai"):
        try:
            versions.append("{} {}".format(name, __import__(name).__version__))
        except ImportError:
            pass
    print(", ".join(versions))
    host.start()
    results = {}
    try:
        address = wait_for_gateway(host)
        client = modelhost.Client(host.endpoint)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not any(d["name"] == "espeak" and d["state"] == "ready"
                      for d in client.ps()["daemons"]):
            if time.monotonic() > deadline:
                raise SystemExit("espeak did not become ready:\n" + host.log_tail())
            time.sleep(0.1)
        connection = http.client.HTTPConnection(address["host"], address["port"], timeout=60)
        sdk = openai.OpenAI(base_url=address["url"] + "/v1", api_key="unused",
                            max_retries=0) if use_openai else None
        paths = [("direct", lambda text: direct_call(client, text)),
                 ("gateway", lambda text: gateway_call(connection, text))]
        if sdk is not None:
            paths.append(("openai", lambda text: openai_call(sdk, text)))
        for label, text in TEXTS:
            for _ in range(10):  # warm-up: connections, imports, caches
                for _, call in paths:
                    call(text)
            times = {name: ([], []) for name, _ in paths}
            sizes = {}
            for i in range(calls):
                order = paths if i % 2 == 0 else list(reversed(paths))
                for name, call in order:
                    first, total, size = call(text)
                    times[name][0].append(first)
                    times[name][1].append(total)
                    sizes[name] = size
            results[label] = {name: {"ttfb": summary(first), "total": summary(total),
                                     "bytes": sizes[name]}
                              for name, (first, total) in times.items()}
        connection.close()
        client.close()
    finally:
        host.stop()
    load_end = os.getloadavg()
    print("cpus {}, load average at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
          .format(os.cpu_count(), *(load_start + load_end)))
    print("{} calls per path and text, interleaved; ms, nearest-rank percentiles\n".format(calls))
    print("{:<6} {:<8} {:>9} {:>9} {:>10} {:>10} {:>9}".format(
        "text", "path", "ttfb p50", "ttfb p95", "total p50", "total p95", "bytes"))
    for label, by_path in results.items():
        for name, row in by_path.items():
            print("{:<6} {:<8} {:>9.3f} {:>9.3f} {:>10.3f} {:>10.3f} {:>9}".format(
                label, name, row["ttfb"][0], row["ttfb"][1], row["total"][0], row["total"][1],
                row["bytes"]))
        print()
    print("gateway against direct:")
    for label, by_path in results.items():
        direct, gateway = by_path["direct"], by_path["gateway"]
        added = [gateway["ttfb"][i] - direct["ttfb"][i] for i in (0, 1)]
        added_total = [gateway["total"][i] - direct["total"][i] for i in (0, 1)]
        met = "met" if added[0] < TARGET_ADDED_MS else "NOT met"
        print("  {}: first byte +{:.3f} ms p50, +{:.3f} ms p95 (ratio {:.2f}x at p50; target "
              "< {:.0f} ms added: {}); total +{:.3f} ms p50, +{:.3f} ms p95 (ratio {:.2f}x)"
              .format(label, added[0], added[1], gateway["ttfb"][0] / direct["ttfb"][0],
                      TARGET_ADDED_MS, met, added_total[0], added_total[1],
                      gateway["total"][0] / direct["total"][0]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
