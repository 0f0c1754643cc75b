"""The `modelhost` command line: up, setup, ps, call, say.

Client commands (ps, call, say) need only pyzmq and msgpack. `up` and `setup`
import the broker package lazily, as the layering rules allow.
"""

import argparse
import json
import sys
import wave

from . import protocol
from ._client import Client
from .errors import ModelhostError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _endpoint(args):
    if getattr(args, "endpoint", None):
        return args.endpoint
    if getattr(args, "config", None):
        from modelhost.broker.config import load_config

        return load_config(args.config).broker.frontend
    return protocol.default_endpoint()


# --- up and setup (broker side) ------------------------------------------------


def _load_config_or_exit(path):
    from modelhost.broker.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print("modelhost: the configuration is not valid, nothing was started:\n{}".format(exc),
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _run_setup(config, names, force):
    from modelhost.broker import envs

    unknown = [name for name in names if name not in config.daemons]
    if unknown:
        print("modelhost: no daemon named {}; the configuration has: {}".format(
            ", ".join(unknown), ", ".join(config.daemons)), file=sys.stderr)
        return EXIT_USAGE
    daemons = [config.daemons[name] for name in (names or config.daemons)]
    results = envs.setup_all(daemons, force=force,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    for result in results:
        print("{:<10} {}".format(result.action, result.message), file=sys.stderr)
    return EXIT_ERROR if any(r.action == "failed" for r in results) else 0


def cmd_setup(args):
    config = _load_config_or_exit(args.config)
    return _run_setup(config, args.names, args.force)


def cmd_up(args):
    config = _load_config_or_exit(args.config)
    protocol.configure_logging("supervisor", config.broker.log_level)
    if not args.no_setup:
        # Idempotent and quick when nothing changed; on a fresh machine this
        # is what builds the daemons' venvs.
        names = [name for name, daemon in config.daemons.items() if daemon.autostart]
        if _run_setup(config, names, force=False) != 0:
            print("modelhost: setting up a daemon's environment failed (see above); fix it or "
                  "start with --no-setup", file=sys.stderr)
            return EXIT_ERROR
    from modelhost.broker.supervisor import Supervisor

    print("modelhost: starting {} daemons from {}; Ctrl-C stops everything".format(
        len(config.daemons), config.path), file=sys.stderr)
    return Supervisor(config).run()


# --- ps ------------------------------------------------------------------------


def _duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return "{}s".format(seconds)
    if seconds < 7200:
        return "{}m".format(seconds // 60)
    return "{}h{:02d}m".format(seconds // 3600, seconds % 3600 // 60)


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


def _size(value):
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return "{:.0f} {}".format(value, unit) if unit == "B" else "{:.1f} {}".format(
                value, unit)
        value /= 1024.0


PS_COLUMNS = [
    ("NAME", lambda d: d["name"]),
    ("STATE", lambda d: d["state"]),
    ("PID", lambda d: str(d.get("pid") or "-")),
    ("PYTHON", lambda d: d.get("python") or "-"),
    ("UPTIME", lambda d: _duration(d.get("uptime_s"))),
    ("MEM", lambda d: _size(d.get("memory_bytes"))),
    ("QUEUE", lambda d: "{}/{}".format(d.get("queued", 0), d.get("max_queue", "-"))),
    ("RUN", lambda d: "{}/{}".format(d.get("running", 0), d.get("concurrency", "-"))),
    ("LOADS", lambda d: str(d.get("loads", 0))),
    ("RESTARTS", lambda d: str(d.get("restarts", 0))),
    ("LAST ERROR", lambda d: (d.get("last_error") or "").split("\n")[0][:80]),
]


def cmd_ps(args):
    with Client(_endpoint(args)) as client:
        status = client.ps(timeout=args.timeout)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    broker = status["broker"]
    print("broker pid {} up {}, clients at {}".format(broker["pid"], _duration(broker["uptime_s"]),
                                                    broker["frontend"]))
    memory = status.get("memory") or {}
    for device in memory.get("devices", []):
        print("{}: {} used of {}, {} free (probe: {})".format(
            device["name"], _size(device["used"]), _size(device["total"]), _size(device["free"]),
            memory["probe"]))
    print(format_table(status["daemons"], PS_COLUMNS))
    return 0


# --- call and say ----------------------------------------------------------------


def parse_assignment(text):
    """key=value: value as JSON when it parses, else a string; key=@file reads bytes."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError("expected key=value, got {!r}".format(text))
    if value.startswith("@"):
        with open(value[1:], "rb") as handle:
            return key, handle.read()
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _printable(value):
    if isinstance(value, (bytes, bytearray)):
        return "<{} bytes>".format(len(value))
    if type(value).__name__ == "ndarray":
        return "<array {} {}>".format(value.dtype, list(value.shape))
    if isinstance(value, dict):
        return {key: _printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_printable(item) for item in value]
    return value


def _binary_of(value):
    """The one binary value in a result, for -o."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if type(value).__name__ == "ndarray":
        return value.tobytes()
    if isinstance(value, dict):
        found = [item for item in value.values()
                 if isinstance(item, (bytes, bytearray)) or type(item).__name__ == "ndarray"]
        if len(found) == 1:
            return _binary_of(found[0])
        raise ModelhostError("the result has {} binary fields, so -o cannot tell which to "
                             "write; fields: {}".format(len(found), ", ".join(value)))
    raise ModelhostError("the result holds no binary data to write; leave out -o")


class ProgressLine(object):
    """A one-line progress bar on stderr, redrawn in place (silent when not a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.active = stream.isatty()
        self.drawn = False

    def __call__(self, progress):
        if not self.active:
            return
        fraction = progress.fraction or 0.0
        bar = "#" * int(fraction * 30)
        text = " ".join(filter(None, [progress.stage, progress.message]))
        self.stream.write("\r[{:<30}] {:3.0f}% {}".format(bar, fraction * 100, text)[:120])
        self.stream.flush()
        self.drawn = True

    def finish(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def cmd_call(args):
    arguments = dict(parse_assignment(item) for item in args.arguments)
    progress = ProgressLine()
    with Client(_endpoint(args), timeout=args.timeout) as client:
        try:
            if args.stream:
                stream = client.stream(args.model, args.method, on_progress=progress,
                                       priority=args.priority, arguments=arguments)
                for chunk in stream:
                    print(json.dumps(_printable(chunk), default=str), flush=True)
                result = stream.result
            else:
                result = client.call(args.model, args.method, on_progress=progress,
                                     priority=args.priority, arguments=arguments)
        finally:
            progress.finish()
    if args.output:
        data = _binary_of(result)
        with open(args.output, "wb") as handle:
            handle.write(data)
        print("wrote {} bytes to {}".format(len(data), args.output), file=sys.stderr)
    else:
        print(json.dumps(_printable(result), indent=None if args.json else 2, default=str))
    return 0


def write_wav(path, pcm_s16le, sample_rate, channels=1):
    with wave.open(path, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm_s16le)


def cmd_say(args):
    arguments = {"text": args.text}
    if args.voice:
        arguments["voice"] = args.voice
    with Client(_endpoint(args), timeout=args.timeout) as client:
        speech = client.call(args.model, "tts", arguments=arguments)
    write_wav(args.output, speech["audio"], speech["sample_rate"], speech.get("channels", 1))
    seconds = speech["samples"] / float(speech["sample_rate"])
    if args.json:
        print(json.dumps({"path": args.output, "seconds": seconds,
                          "sample_rate": speech["sample_rate"]}))
    else:
        print("wrote {}: {:.2f}s of speech at {} Hz".format(args.output, seconds,
                                                           speech["sample_rate"]))
    return 0


# --- main --------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="modelhost", description="Serve heavy models as warm daemons behind one broker.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def client_options(p):
        p.add_argument("--endpoint", help="the broker's client endpoint (default: "
                       "$MODELHOST_ENDPOINT or the runtime dir's socket)")
        p.add_argument("--config", help="take the endpoint from this configuration file")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    up = sub.add_parser("up", help="run the broker and its daemons in the foreground")
    up.add_argument("--config", help="configuration file (default: the embedded default)")
    up.add_argument("--no-setup", action="store_true",
                    help="do not create or update the daemons' venvs first")
    up.set_defaults(handler=cmd_up)

    setup = sub.add_parser("setup", help="create or update the daemons' venvs")
    setup.add_argument("names", nargs="*", metavar="NAME", help="daemons (default: all)")
    setup.add_argument("--config", help="configuration file (default: the embedded default)")
    setup.add_argument("--force", action="store_true", help="recreate even if up to date")
    setup.set_defaults(handler=cmd_setup)

    ps = sub.add_parser("ps", help="list the daemons and their state")
    client_options(ps)
    ps.add_argument("--timeout", type=float, default=5.0)
    ps.set_defaults(handler=cmd_ps)

    call = sub.add_parser("call", help="call METHOD of MODEL with key=value arguments")
    client_options(call)
    call.add_argument("model")
    call.add_argument("method")
    call.add_argument("arguments", nargs="*", metavar="key=value",
                      help="values are JSON when they parse, else strings; key=@FILE sends "
                           "the file's bytes")
    call.add_argument("-o", "--output", help="write the result's binary data to this file")
    call.add_argument("--stream", action="store_true", help="print streamed chunks as they come")
    call.add_argument("--timeout", type=float, help="seconds before the call is abandoned")
    call.add_argument("--priority", default=protocol.Priority.NORMAL,
                      choices=protocol.Priority.ALL)
    call.set_defaults(handler=cmd_call)

    say = sub.add_parser("say", help="speak TEXT into a WAV file with the default TTS daemon")
    client_options(say)
    say.add_argument("text")
    say.add_argument("-o", "--output", required=True, help="the WAV file to write")
    say.add_argument("--voice", help="a voice name (see `modelhost call espeak voices`)")
    say.add_argument("--model", default="espeak", help="the TTS daemon (default: espeak)")
    say.add_argument("--timeout", type=float, default=60.0)
    say.set_defaults(handler=cmd_say)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ModelhostError as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
