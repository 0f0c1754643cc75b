"""A scripted 10-turn voice chat through modelhost against the same conversation the old way.

    python3 bench/chat.py [--turns N] [--quick] [--token-delay S] [--load-s S ...] [--json FILE]

Each turn starts from a WAV file of the user's question (spoken by espeak
beforehand), goes through speech recognition, a language model and
text-to-speech, and ends when the reply's last audio is out. The language
model is the local OpenAI-compatible TEST SERVER of the tests
(tests/openai_test_server.py: a fixed reply per turn, streamed at
`--token-delay` seconds a token, 0.01 by default: 100 tokens a second), the
same for both paths.

  modelhost  modelhost.pipelines.chat (Chat.turn(audio=...)) against a real
             `modelhost up` whose daemons stay loaded: one `transcribe` call,
             the reply streamed and cut into sentences, a streamed `tts` call
             per sentence (two outstanding), audio handed on as it arrives.
  old way    what the loop replaces: per turn a fresh `python -c` that imports
             the ASR engine, loads it, transcribes the file and exits; the
             whole reply from the language model; then a fresh `python -c`
             that imports the TTS engine, loads it, speaks the whole reply into
             a WAV file and exits. Its first audio is that file.

on two sets of engines (on this interpreter, `venv: false`, for both paths):

  default    the embedded default's: espeak-ng and PocketSphinx (loads of
             ~0.05 s and ~0.5 s);
  slow-load  the same engines with a realistic load time: each load() first
             sleeps S seconds (bench/engines/chat_engine.py), as reading a real
             model's weights from disk does. By default one set at 3 s (the
             low end: a small Whisper model) and one at 10 s (nearer
             CosyVoice2, three networks and two ONNX frontends; not measured
             here, there are no weights): `--load-s` picks the values.

The turns of the two paths alternate (turn i through modelhost, then turn i
the old way), so that drift on the machine hits both. Per path: time to the
first audio and total per turn, p50 and p95 (nearest rank), and the ratios
old / modelhost. modelhost's own cost per turn is printed two ways: from the
broker's request events, each call's time as the chat saw it minus the
broker's queue and run time for it (the transit through client, broker and
daemon runtime), summed per turn, beside the engines' summed run time; and a
do-nothing turn (bench/engines/chat_engine.py:NullSpeechEngine for ASR and
TTS, no language model: the echo rule), whose whole time is the chat loop's
and modelhost's. Nothing asserts on timings.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))
from _common import UpHost, percentile  # noqa: E402
from openai_test_server import OpenAITestServer  # noqa: E402

import modelhost  # noqa: E402
from modelhost.pipelines import chat_io  # noqa: E402
from modelhost.pipelines.chat import Chat, ChatConfig  # noqa: E402

READY_TIMEOUT_S = 120.0
SLOW_LOADS_S = (3.0, 10.0)

CONVERSATION = [
    ("what is two plus two", "Two plus two is four. Is there anything else?"),
    ("and three times three", "Three times three is nine. That one is easy."),
    ("what day is it", "I cannot see a calendar from here. Your computer knows, though."),
    ("tell me a short joke", "Why did the scarecrow win a prize? He was outstanding in his "
                             "field."),
    ("how far is the moon", "The moon is about three hundred eighty four thousand "
                            "kilometers away. Light takes about a second to get there."),
    ("what is the capital of france", "The capital of France is Paris. It sits on the "
                                      "Seine."),
    ("how do i boil an egg", "Put the egg in boiling water. Wait about nine minutes. Then "
                             "cool it in cold water."),
    ("what is a prime number", "A prime number has exactly two divisors. Two, three and five "
                               "are the first ones."),
    ("say something nice", "You are doing great today. Keep going."),
    ("thank you goodbye", "You are welcome. Goodbye, and have a good evening."),
]

ENGINE_SETS = {
    "default": {
        "tts": ("modelhost.daemons.espeak.engine", "EspeakEngine", {"voice": "en-us"}),
        "asr": ("modelhost.daemons.asr.pocketsphinx_engine", "PocketsphinxEngine", {}),
    },
    "null": {
        "tts": ("chat_engine", "NullSpeechEngine", {}),
        "asr": ("chat_engine", "NullSpeechEngine", {}),
    },
}


def slow_load_set(seconds):
    """The default engines behind a load() that first sleeps `seconds`."""
    return {
        "tts": ("chat_engine", "SlowLoadEspeak", {"voice": "en-us", "load_seconds": seconds}),
        "asr": ("chat_engine", "SlowLoadPocketsphinx", {"load_seconds": seconds}),
    }

# The old way, one stage: a fresh interpreter imports the engine, loads it, runs one call.
OLD_STAGE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
module, name, options, method, arguments = json.loads(sys.argv[2])
engine = getattr(__import__(module, fromlist=[name]), name)(**options)
engine.load()
from modelhost.daemons.engine import CallContext
ctx = CallContext(1, method, False, lambda kind, value: None)
if method == "transcribe":
    arguments["audio"] = open(arguments.pop("path"), "rb").read()
    print(json.dumps({"text": engine.transcribe(ctx, **arguments)["text"]}))
else:
    out = arguments.pop("out")
    result = engine.tts(ctx, **arguments)
    import wave
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1); wav.setsampwidth(2); wav.setframerate(result["sample_rate"])
        wav.writeframes(result["audio"])
    print(json.dumps({"samples": result["samples"]}))
"""


def log(line):
    print(line, file=sys.stderr, flush=True)


def daemon_yaml(name, module, cls, options):
    return ("  {name}:\n"
            "    engine: {module}:{cls}\n"
            "    python: {python}\n"
            "    venv: false\n"
            "    pythonpath: [{engines}]\n"
            "    options: {options}\n"
            "    concurrency: {concurrency}\n"
            "    ready_timeout_s: 120\n"
            "    preload: true\n").format(
        name=name, module=module, cls=cls, python=json.dumps(sys.executable),
        engines=json.dumps(str(HERE / "engines")), options=json.dumps(options),
        concurrency=2 if name == "asr" else 1)


class Host(UpHost):
    def __init__(self, directory, engines):
        super(Host, self).__init__(directory, ["heartbeat_s: 0.5", "http: null"], [
            daemon_yaml(name, *engines[name]) for name in ("tts", "asr")])

    def wait_loaded(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        with modelhost.Client(self.endpoint) as client:
            while True:
                if self.process.poll() is not None:
                    raise SystemExit("modelhost up exited:\n" + self.log_tail())
                try:
                    rows = client.ps(timeout=2.0)["daemons"]
                    if len(rows) == 2 and all(r["state"] == "ready" and r["tier"] == "resident"
                                              for r in rows):
                        return
                except modelhost.ModelhostError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("daemons not loaded in time:\n" + self.log_tail())
                time.sleep(0.1)


class RequestEvents(object):
    """The broker's request events, read on a thread."""

    def __init__(self, endpoint):
        self.lock = threading.Condition()
        self.items = []
        self._client = modelhost.Client(endpoint)
        self._stream = self._client.events(kinds=["request"], timeout=None)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        with modelhost.Client(endpoint) as probe:  # subscribed once a probe's event arrives
            for _ in range(60):
                probe.call("asr", "transcribe", audio=b"\0\0" * 1600, sample_rate=16000)
                if self.take(lambda e: e["method"] == "transcribe", wait_s=0.5):
                    break
            else:
                raise SystemExit("no request events from the broker")
        time.sleep(0.5)  # a probe's event still on its way
        with self.lock:
            self.items = []

    def _run(self):
        for event in self._stream:
            with self.lock:
                self.items.append(event)
                self.lock.notify_all()

    def take(self, predicate, count=1, wait_s=10.0):
        """Wait for `count` events that match, remove and return them ([] on time out)."""
        with self.lock:
            self.lock.wait_for(lambda: len([e for e in self.items if predicate(e)]) >= count,
                               wait_s)
            found = [e for e in self.items if predicate(e)]
            if len(found) < count:
                return []
            self.items = [e for e in self.items if not predicate(e)]
            return found


def modelhost_turn(chat, events, wav):
    result = chat.turn(audio=str(wav))
    calls = [c for c in result.calls if c.stage in ("asr", "tts")]
    got = events.take(lambda e: e["method"] in ("transcribe", "tts"), count=len(calls))
    events.take(lambda e: e["method"] == "load", wait_s=0.0)
    transit, engines = [], 0.0
    for stage, method in (("asr", "transcribe"), ("tts", "tts")):
        mine = sorted((c for c in calls if c.stage == stage), key=lambda c: c.ended_s)
        theirs = [e for e in got if e["method"] == method]
        for call, event in zip(mine, theirs):
            queued, ran = event.get("queue_s") or 0.0, event.get("run_s") or 0.0
            transit.append((call.ended_s - call.submitted_s) - queued - ran)
            engines += ran
    return {"first_audio_s": result.metrics["first_audio_s"], "total_s": result.metrics["total_s"],
            "transcript_s": result.metrics["transcript_s"],
            "first_token_s": result.metrics["first_token_s"], "outcome": result.outcome,
            "transcript": result.transcript, "calls": len(calls), "engines_run_s": engines,
            "transit_s": sum(transit), "transit_per_call_s": transit}


def old_turn(engines, wav, server, out, model):
    import openai

    started = time.monotonic()
    asr_module, asr_class, asr_options = engines["asr"]
    heard = _stage(asr_module, asr_class, asr_options, "transcribe", {"path": str(wav)})
    transcript_s = time.monotonic() - started
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    reply = []
    stream = client.chat.completions.create(
        model=model, stream=True,
        messages=[{"role": "user", "content": heard["text"] or "hello"}])
    first_token = None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first_token = first_token or time.monotonic() - started
                reply.append(choice.delta.content)
    client.close()
    tts_module, tts_class, tts_options = engines["tts"]
    options = dict(tts_options)
    voice = options.pop("voice", None)
    _stage(tts_module, tts_class, options, "tts", {"text": "".join(reply), "voice": voice,
                                                    "out": str(out)})
    total = time.monotonic() - started
    return {"first_audio_s": total, "total_s": total, "transcript_s": transcript_s,
            "first_token_s": first_token, "transcript": heard["text"]}


def _stage(module, cls, options, method, arguments):
    run = subprocess.run([sys.executable, "-c", OLD_STAGE, str(HERE / "engines"),
                          json.dumps([module, cls, options, method, arguments])],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit("the old way's {} stage failed:\n{}".format(method, run.stderr[-3000:]))
    return json.loads(run.stdout.strip().splitlines()[-1])


def make_questions(directory, turns):
    from modelhost.daemons.engine import CallContext
    from modelhost.daemons.espeak.engine import EspeakEngine

    engine = EspeakEngine(voice="en-us", rate=150)
    engine.load()
    paths = []
    for index, (question, _) in enumerate(CONVERSATION[:turns]):
        said = engine.tts(CallContext(index, "tts", False, lambda kind, value: None),
                          text=question)
        path = Path(directory) / "question-{:02d}.wav".format(index)
        path.write_bytes(chat_io.wav_bytes(said["audio"], said["sample_rate"]))
        paths.append(path)
    engine.unload()
    return paths


def summary(rows, key):
    values = sorted(row[key] for row in rows if row.get(key) is not None)
    return percentile(values, 0.5), percentile(values, 0.95)


def run_set(name, directory, questions, server, turns, old_too=True):
    engines = ENGINE_SETS[name]
    host = Host(Path(directory) / name.replace(" ", "-"), engines)
    log("[{}] starting modelhost up".format(name))
    host.start()
    rows = {"modelhost": [], "old way": []}
    try:
        host.wait_loaded()
        up_s = time.monotonic() - host.started_at
        log("[{}] daemons loaded {:.1f}s after start".format(name, up_s))
        events = RequestEvents(host.endpoint)
        llm = {"url": server.url, "model": "test-model"} if name != "null" else {}
        config = ChatConfig.from_dict({"llm": llm, "tts": {"model": "tts", "voice": "en-us"}
                                       if name != "null" else {"model": "tts"},
                                       "asr": {"model": "asr"}, "timeout_s": 300})
        with Chat(config, endpoint=host.endpoint) as chat:
            for index in range(turns):
                wav = questions[index % len(questions)]
                server.reply = CONVERSATION[index % len(CONVERSATION)][1]
                row = modelhost_turn(chat, events, wav)
                rows["modelhost"].append(row)
                line = "[{}] turn {:2d} modelhost: first audio {:.3f}s, total {:.3f}s".format(
                    name, index + 1, row["first_audio_s"], row["total_s"])
                if old_too:
                    old = old_turn(engines, wav, server, Path(directory) / "old.wav",
                                   "test-model")
                    rows["old way"].append(old)
                    line += "; old way: {:.3f}s".format(old["total_s"])
                log(line + "  ({!r})".format(row["transcript"]))
    finally:
        host.stop()
    return rows, up_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--null-turns", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 turns, 5 do-nothing turns")
    parser.add_argument("--token-delay", type=float, default=0.01,
                        help="seconds per LLM token (default 0.01)")
    parser.add_argument("--load-s", type=float, nargs="+", default=list(SLOW_LOADS_S),
                        help="load times of the slow-load sets (default 3 10)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    for seconds in args.load_s:
        ENGINE_SETS["slow-load {:g}s".format(seconds)] = slow_load_set(seconds)
    measured = [name for name in ENGINE_SETS if name != "null"]
    if args.quick:
        args.turns, args.null_turns = 3, 5
    load = os.getloadavg()
    print("modelhost chat bench - {}".format(time.strftime("%Y-%m-%dT%H:%M:%S%z")))
    print("python {}, cpus {}, load average at start {:.2f} {:.2f} {:.2f}".format(
        platform.python_version(), os.cpu_count(), *load))
    print("{} turns per path and engine set, LLM test server at {:.0f} tokens/s; "
          "{} do-nothing turns".format(args.turns, 1.0 / args.token_delay if args.token_delay
                                       else float("inf"), args.null_turns))
    results = {}
    with tempfile.TemporaryDirectory(prefix="mh-chat-", dir="/tmp") as directory, \
            OpenAITestServer(token_delay=args.token_delay) as server:
        questions = make_questions(directory, min(args.turns, len(CONVERSATION)))
        for name in measured:
            results[name] = run_set(name, directory, questions, server, args.turns)
        server.token_delay = 0.0
        results["null"] = run_set("null", directory, questions, server, args.null_turns,
                                  old_too=False)
    print("load average at end {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print()
    print("{:<14} {:<10} {:>9} {:>9} {:>9} {:>9} {:>10}".format(
        "engines", "path", "1st audio", "p95", "total", "p95", "transcript"))
    print("{:<14} {:<10} {:>9} {:>9} {:>9} {:>9} {:>10}".format(
        "", "", "p50 s", "s", "p50 s", "s", "p50 s"))
    report = {}
    for name in measured + ["null"]:
        rows, up_s = results[name]
        report[name] = {"up_to_loaded_s": up_s, "turns": rows}
        for path in ("modelhost", "old way"):
            if not rows[path]:
                continue
            first = summary(rows[path], "first_audio_s")
            total = summary(rows[path], "total_s")
            heard = summary(rows[path], "transcript_s")
            print("{:<14} {:<10} {:>9.3f} {:>9.3f} {:>9.3f} {:>9.3f} {:>10.3f}".format(
                name, path, first[0], first[1], total[0], total[1], heard[0]))
    print()
    print("ratios (old way / modelhost):")
    for name in measured:
        rows = results[name][0]
        first_m, first_o = summary(rows["modelhost"], "first_audio_s"), summary(
            rows["old way"], "first_audio_s")
        total_m, total_o = summary(rows["modelhost"], "total_s"), summary(rows["old way"],
                                                                            "total_s")
        print("  {:<14} first audio p50 {:.1f}x, p95 {:.1f}x; total p50 {:.1f}x, p95 {:.1f}x".format(
            name, first_o[0] / first_m[0], first_o[1] / first_m[1], total_o[0] / total_m[0],
            total_o[1] / total_m[1]))
    print()
    print("modelhost's own cost per turn:")
    for name in measured + ["null"]:
        rows = results[name][0]["modelhost"]
        transit = summary(rows, "transit_s")
        engines = summary(rows, "engines_run_s")
        per_call = sorted(t for row in rows for t in row["transit_per_call_s"])
        print("  {:<14} calls outside the daemons' run: p50 {:.1f} ms a turn ({:.2f} ms a call, "
              "{:.1f} calls), engines' summed run time p50 {:.3f}s, turn total p50 {:.3f}s".format(
                  name, 1000 * transit[0], 1000 * percentile(per_call, 0.5),
                  sum(r["calls"] for r in rows) / float(len(rows)), engines[0],
                  summary(rows, "total_s")[0]))
    null_rows = results["null"][0]["modelhost"]
    print("  do-nothing turn (null engines, echo reply): first audio p50 {:.1f} ms, total p50 "
          "{:.1f} ms, p95 {:.1f} ms".format(
              1000 * summary(null_rows, "first_audio_s")[0],
              1000 * summary(null_rows, "total_s")[0], 1000 * summary(null_rows, "total_s")[1]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
