"""The `modelhost` command line: up, gateway, setup, install-systemd, logs, keys, ps, top, events,
call, say, transcribe, load, unload, pin, unpin, the model verbs tts,
text-to-audio, talking-head, and the pipeline audio-drama.

Client commands need only pyzmq and msgpack (the model verbs numpy, and
soundfile to write audio; top the rich library). `up`, `setup` and
`install-systemd` import the broker package lazily, as the layering rules allow.
"""

import argparse
import json
import os
import re
import sys
import time
import wave
from pathlib import Path

from . import _curve, _format, protocol
from ._client import Client
from .errors import ModelhostError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _endpoint(args):
    if getattr(args, "endpoint", None):
        return args.endpoint
    if getattr(args, "config", None):
        from modelhost.broker.config import load_config

        broker = load_config(args.config).broker
        if broker.curve is not None and not (os.environ.get(_curve.SERVER_KEY_ENV)
                                             or os.environ.get(_curve.CLIENT_KEY_ENV)):
            # On the broker's host, as a user who can read its secret key: connect
            # as the broker itself, whose key is always let in.
            os.environ[_curve.SERVER_KEY_ENV] = str(broker.curve.secret_key)
            os.environ[_curve.CLIENT_KEY_ENV] = str(broker.curve.secret_key)
        return broker.frontend
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
    """(exit status, [SetupResult]): setup of the named daemons (all by default)."""
    from modelhost.broker import envs

    unknown = [name for name in names if name not in config.daemons]
    if unknown:
        print("modelhost: no daemon named {}; the configuration has: {}".format(
            ", ".join(unknown), ", ".join(config.daemons)), file=sys.stderr)
        return EXIT_USAGE, []
    daemons = [config.daemons[name] for name in (names or config.daemons)]
    results = envs.setup_all(daemons, force=force,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    for result in results:
        print("{:<10} {}".format(result.action, result.message), file=sys.stderr)
        for line in getattr(result, "cannot", None) or []:
            print("{:<10} {}: not here: {}".format("", result.name, line), file=sys.stderr)
    return (EXIT_ERROR if any(r.action == "failed" for r in results) else 0), results


def cmd_setup(args):
    config = _load_config_or_exit(args.config)
    return _run_setup(config, args.names, args.force)[0]


def cmd_install_systemd(args):
    from modelhost.broker import systemd_units

    try:
        config = systemd_units.load_for_systemd(args.config, args.user)
    except Exception as exc:  # ConfigError: the broker package's, imported lazily
        print("modelhost: the configuration is not valid:\n{}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    target = Path(args.dir) if args.dir else systemd_units.unit_dir(args.user)
    files = {target / relative: text for relative, text
             in systemd_units.render(config, target, user=args.user).items()}
    if not args.user:
        # The system broker runs as user modelhost: polkit lets it start and stop
        # the daemon units, and nothing else.
        rule, text = systemd_units.polkit_rule(Path(args.dir) if args.dir else None)
        files[rule] = text
    if args.dry_run:
        for path, text in files.items():
            print("# --- {}\n{}".format(path, text))
        return 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print("wrote {}".format(path), file=sys.stderr)
    scope = "--user " if args.user else ""
    if not args.user and not systemd_units.service_user_exists():
        print("create the service user first: useradd --system --home-dir {} --shell "
              "/usr/sbin/nologin {}".format(config.broker.state_dir,
                                            systemd_units.SERVICE_USER), file=sys.stderr)
    print("then: systemctl {0}daemon-reload && systemctl {0}enable --now modelhost.target"
          .format(scope), file=sys.stderr)
    return 0


def cmd_up(args):
    config = _load_config_or_exit(args.config)
    protocol.configure_logging("supervisor", config.broker.log_level)
    setup_failed = {}
    if not args.no_setup:
        # Idempotent and quick when nothing changed; on a fresh machine this
        # is what builds the daemons' venvs.
        names = [name for name, daemon in config.daemons.items() if daemon.autostart]
        # A daemon whose setup failed is not started from its broken venv (it could
        # only crash-loop); it shows `failed` in ps with the setup's last lines, and
        # the other daemons start.
        for result in _run_setup(config, names, force=False)[1]:
            if result.action == "failed":
                detail = result.message[len(result.name) + 2:] \
                    if result.message.startswith(result.name + ": ") else result.message
                setup_failed[result.name] = "not started: its venv setup failed (fix it, then " \
                    "`modelhost setup {}`): {}".format(result.name, detail)
        if setup_failed:
            print("modelhost: setting up {} failed (see above): not starting {}; the others "
                  "start".format(", ".join(setup_failed), "it" if len(setup_failed) == 1
                                 else "them"), file=sys.stderr)
    from modelhost.broker.supervisor import Supervisor

    print("modelhost: starting {} daemons from {}; Ctrl-C stops everything".format(
        len(config.daemons), config.path), file=sys.stderr)
    return Supervisor(config, setup_failed=setup_failed).run()


def cmd_gateway(args):
    """The OpenAI-compatible gateway in the foreground, for the broker of the configuration."""
    from modelhost.broker.config import ConfigError, gateway_spec

    config = _load_config_or_exit(args.config)
    try:
        spec = gateway_spec(config, listen=args.listen)
    except ConfigError as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    if args.endpoint:
        spec["endpoint"] = args.endpoint
    from modelhost.gateway import serve

    return serve(spec)


def cmd_logs(args):
    from . import _logs

    return _logs.main(args.name, args.lines, args.follow, args.config)


# --- keys ----------------------------------------------------------------------

KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _default_keys_dir(config_path):
    if config_path:
        from modelhost.broker.config import load_config

        return load_config(config_path).broker.state_dir / "keys"
    # The broker's default state dir, worked out here: clients make keys too,
    # on machines without the broker package.
    state = os.environ.get("MODELHOST_STATE_DIR")
    if not state:
        xdg = os.environ.get("XDG_STATE_HOME")
        state = os.path.join(xdg, "modelhost") if xdg else "~/.local/state/modelhost"
    return Path(os.path.abspath(os.path.expanduser(state))) / "keys"


def cmd_keys(args):
    import zmq.auth

    if not KEY_NAME.match(args.name):
        print("modelhost: key name {!r}: use letters, digits, '_', '.' and '-'".format(
            args.name), file=sys.stderr)
        return EXIT_USAGE
    directory = Path(os.path.abspath(os.path.expanduser(args.dir))) if args.dir \
        else _default_keys_dir(args.config)
    public, secret = directory / (args.name + ".key"), directory / (args.name + ".key_secret")
    existing = [str(path) for path in (public, secret) if path.exists()]
    if existing and not args.force:
        print("modelhost: {} already exist(s); pass --force to replace the key pair (whoever "
              "holds the old public key is then refused)".format(", ".join(existing)),
              file=sys.stderr)
        return EXIT_ERROR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Owner-only from the first byte: create_certificates writes with the umask.
    old_umask = os.umask(0o077)
    try:
        for path in (public, secret):
            if path.exists():
                path.unlink()
        zmq.auth.create_certificates(str(directory), args.name)
    finally:
        os.umask(old_umask)
    os.chmod(str(secret), 0o600)
    os.chmod(str(public), 0o644)  # a public key is meant to be copied around
    print("wrote {} (public) and {} (secret, owner-only)\n"
          "as the broker's key pair: in its configuration,\n"
          "    broker:\n"
          "      curve:\n"
          "        secret_key: {}\n"
          "        authorized_keys: {}   # the clients' public NAME.key files\n"
          "  and give clients {} (their MODELHOST_CURVE_SERVER_KEY)\n"
          "as a client's key pair: copy {} into the broker's authorized_keys directory,\n"
          "  and on this client: export MODELHOST_CURVE_CLIENT_KEY={}\n"
          "                      export MODELHOST_CURVE_SERVER_KEY=<the broker's NAME.key>"
          .format(public, secret, secret, directory / "authorized", public, public, secret))
    return 0


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
    with Client(_endpoint(args)) as client:
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
    with Client(_endpoint(args)) as client:
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
    endpoint, frames, clear = _endpoint(args), 0, sys.stdout.isatty() and not args.json
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
    return _top.run(_endpoint(args), args.interval, args.timeout)


def _positive(convert):
    """An argparse type: `convert`, and more than zero."""
    def parse(text):
        value = convert(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be more than 0, got {}".format(text))
        return value
    return parse


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


def cmd_memory_op(args):
    started = time.monotonic()
    with Client(_endpoint(args)) as client:
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
        self.fraction = 0.0

    def __call__(self, progress):
        if not self.active:
            return
        # A stage without a fraction (a decode after the steps) keeps the bar where it was.
        if progress.fraction is not None:
            self.fraction = progress.fraction
        fraction = self.fraction
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


def cmd_transcribe(args):
    with open(args.file, "rb") as handle:
        data = handle.read()
    options = {"language": args.language} if args.language else {}
    progress = ProgressLine()
    with Client(_endpoint(args), timeout=args.timeout) as client:
        try:
            result = client.transcribe(data, model=args.model, on_progress=progress, **options)
        finally:
            progress.finish()
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(result["text"])
    return 0


def _write_audio(args, audio, what):
    audio.write(args.output)
    if args.json:
        print(json.dumps({"path": args.output, "seconds": audio.seconds,
                          "sample_rate": audio.sample_rate,
                          "info": _printable(audio.info)}, default=str))
    else:
        extra = " (seed {})".format(audio.info["seed"]) if "seed" in audio.info else ""
        print("wrote {}: {:.2f}s of {} at {} Hz{}".format(args.output, audio.seconds, what,
                                                         audio.sample_rate, extra))
    return 0


def cmd_tts(args):
    options = {name: getattr(args, name) for name in ("voice", "mode", "prompt_text",
                                                      "instruct_text", "speed")
               if getattr(args, name) is not None}
    if args.prompt_audio:
        options["prompt_audio"] = args.prompt_audio
    with Client(_endpoint(args), timeout=args.timeout) as client:
        speech = client.tts(args.text, model=args.model, **options)
    return _write_audio(args, speech, "speech")


def cmd_text_to_audio(args):
    options = {name: getattr(args, name) for name in ("duration", "steps", "guidance_scale",
                                                      "seed")
               if getattr(args, name) is not None}
    progress = ProgressLine()
    with Client(_endpoint(args), timeout=args.timeout) as client:
        try:
            sound = client.text_to_audio(args.prompt, model=args.model, on_progress=progress,
                                         **options)
        finally:
            progress.finish()
    return _write_audio(args, sound, "audio")


def cmd_audio_drama(args):
    from modelhost.pipelines import drama_cli

    return drama_cli.run(args, _endpoint(args))


def cmd_chat(args):
    from modelhost.pipelines import chat_cli

    return chat_cli.run(args, _endpoint)


def cmd_talking_head(args):
    progress = ProgressLine()
    with Client(_endpoint(args), timeout=args.timeout) as client:
        try:
            video = client.talking_head(args.audio, model=args.model, on_progress=progress)
        finally:
            progress.finish()
    with open(args.output, "wb") as handle:
        handle.write(video)
    if args.json:
        print(json.dumps({"path": args.output, "bytes": len(video)}))
    else:
        print("wrote {}: {} bytes of mp4".format(args.output, len(video)))
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

    units = sub.add_parser("install-systemd", help="render the systemd units from the "
                                                    "configuration and install them")
    units.add_argument("--config", help="configuration file (default: the embedded default)")
    units.add_argument("--user", action="store_true", help="user units (systemctl --user)")
    units.add_argument("--dir", help="where to write them (default: /etc/systemd/system, or "
                                     "~/.config/systemd/user with --user)")
    units.add_argument("--dry-run", action="store_true", help="print them instead")
    units.set_defaults(handler=cmd_install_systemd)

    setup = sub.add_parser("setup", help="create or update the daemons' venvs")
    setup.add_argument("names", nargs="*", metavar="NAME", help="daemons (default: all)")
    setup.add_argument("--config", help="configuration file (default: the embedded default)")
    setup.add_argument("--force", action="store_true", help="recreate even if up to date")
    setup.set_defaults(handler=cmd_setup)

    gateway = sub.add_parser(
        "gateway", help="serve the OpenAI-compatible HTTP API (speech, transcriptions, models) "
        "in the foreground, as a client of the broker",
        description="An OpenAI-compatible HTTP gateway: /v1/audio/speech, "
                    "/v1/audio/transcriptions, /v1/models, /v1/audio/voices. Settings come "
                    "from the configuration's gateway section (or its defaults: "
                    "127.0.0.1:8000, tts-1 -> espeak, whisper-1 -> asr). Needs the gateway "
                    "extra: pip install 'modelhost[gateway]'.")
    gateway.add_argument("--config", help="configuration file (default: the embedded default)")
    gateway.add_argument("--listen", metavar="HOST:PORT",
                         help="where to listen instead of gateway.listen; beyond loopback "
                              "only with API keys in the configuration")
    gateway.add_argument("--endpoint", help="the broker's client endpoint (default: the "
                         "configuration's)")
    gateway.set_defaults(handler=cmd_gateway)

    logs = sub.add_parser("logs", help="a daemon's (or the broker's) recent output under "
                                       "`modelhost up`")
    logs.add_argument("name", metavar="NAME", help="a daemon, or broker")
    logs.add_argument("--config", help="the configuration `modelhost up` runs with (default: "
                      "the embedded default's runtime dir)")
    logs.add_argument("-n", "--lines", type=int, default=100, metavar="LINES",
                      help="how many of the last lines to print (default: 100)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="then print new lines as they come, until Ctrl-C")
    logs.set_defaults(handler=cmd_logs)

    keys = sub.add_parser("keys", help="make a CURVE key pair, for a broker or a client over "
                                       "tcp beyond loopback")
    keys.add_argument("name", nargs="?", default="broker", metavar="NAME",
                      help="the pair's name: NAME.key (public) and NAME.key_secret "
                           "(default: broker)")
    keys.add_argument("--dir", help="where to write them (default: <state_dir>/keys)")
    keys.add_argument("--config", help="take the state dir from this configuration file")
    keys.add_argument("--force", action="store_true", help="replace an existing pair")
    keys.set_defaults(handler=cmd_keys)

    ps = sub.add_parser("ps", help="list the daemons and their state")
    client_options(ps)
    ps.add_argument("--timeout", type=float, default=5.0)
    ps.add_argument("-w", "--wide", action="store_true",
                    help="every column: also device, uptime, loads, evictions, restarts")
    ps.add_argument("--watch", action="store_true",
                    help="print the table again every --interval seconds (in place on a "
                         "terminal) until Ctrl-C")
    ps.add_argument("--interval", type=_positive(float), default=1.0, metavar="S",
                    help="seconds between frames of --watch (default 1)")
    ps.add_argument("--count", type=_positive(int), metavar="N",
                    help="stop after N frames (implies --watch)")
    ps.set_defaults(handler=cmd_ps)

    events = sub.add_parser(
        "events", help="print the broker's events as they happen: state changes, tier "
        "moves, requests, errors")
    client_options(events)
    events.add_argument("-k", "--kind", action="append", choices=protocol.EVENT_KINDS,
                        help="only this kind (repeatable; default: all)")
    events.add_argument("--count", type=_positive(int), metavar="N",
                        help="exit after N events")
    events.add_argument("--timeout", type=_positive(float), metavar="S",
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
    top.add_argument("--interval", type=_positive(float), default=1.0, metavar="S",
                     help="seconds between refreshes (default 1)")
    top.add_argument("--timeout", type=_positive(float), default=2.0, metavar="S",
                     help="seconds to wait for the broker's answer each refresh (default 2)")
    top.set_defaults(handler=cmd_top)

    load = sub.add_parser("load", help="make a daemon resident (evicting idle ones if needed)")
    client_options(load)
    load.add_argument("name", metavar="NAME")
    load.add_argument("--timeout", type=float,
                      help="seconds to wait for room and the load (default: no limit)")
    load.add_argument("--priority", default=protocol.Priority.NORMAL,
                      choices=protocol.Priority.ALL)
    load.set_defaults(handler=cmd_memory_op)

    unload = sub.add_parser("unload", help="release a daemon's weights once its calls end")
    client_options(unload)
    unload.add_argument("name", metavar="NAME")
    unload.add_argument("--timeout", type=float,
                        help="seconds to wait for running calls (default: no limit)")
    unload.set_defaults(handler=cmd_memory_op)

    pin = sub.add_parser("pin", help="never evict a daemon (until unpin)")
    client_options(pin)
    pin.add_argument("name", metavar="NAME")
    pin.set_defaults(handler=cmd_memory_op)

    unpin = sub.add_parser("unpin", help="let a pinned daemon be evicted again")
    client_options(unpin)
    unpin.add_argument("name", metavar="NAME")
    unpin.set_defaults(handler=cmd_memory_op)

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

    transcribe = sub.add_parser("transcribe", help="the text spoken in FILE (WAV or FLAC), "
                                                   "from the speech recognition daemon")
    client_options(transcribe)
    transcribe.add_argument("file", metavar="FILE")
    transcribe.add_argument("--model", default="asr", help="the daemon (default: asr)")
    transcribe.add_argument("--language", help="a language code the daemon's model speaks "
                                               "(default: the daemon's)")
    transcribe.add_argument("--timeout", type=float, default=600.0)
    transcribe.set_defaults(handler=cmd_transcribe)

    tts = sub.add_parser("tts", help="speech for TEXT from CosyVoice2 into an audio file")
    client_options(tts)
    tts.add_argument("text")
    tts.add_argument("-o", "--output", required=True, help="the file to write (.wav, .flac)")
    tts.add_argument("--voice", help="a registered voice id, or a built-in speaker (mode sft)")
    tts.add_argument("--mode", choices=("zero_shot", "cross_lingual", "instruct", "sft"))
    tts.add_argument("--prompt-audio", help="a WAV/FLAC file of the voice to clone (<= 30 s)")
    tts.add_argument("--prompt-text", help="what the prompt audio says")
    tts.add_argument("--instruct-text", help="how to say it (mode instruct)")
    tts.add_argument("--speed", type=float)
    tts.add_argument("--model", default="cosyvoice", help="the daemon (default: cosyvoice)")
    tts.add_argument("--timeout", type=float, default=120.0)
    tts.set_defaults(handler=cmd_tts)

    t2a = sub.add_parser("text-to-audio", help="sound for PROMPT from TangoFlux into a file")
    client_options(t2a)
    t2a.add_argument("prompt")
    t2a.add_argument("-o", "--output", required=True, help="the file to write (.wav, .flac)")
    t2a.add_argument("--duration", type=float, help="seconds, 1 to 30")
    t2a.add_argument("--steps", type=int, help="diffusion steps")
    t2a.add_argument("--guidance-scale", type=float)
    t2a.add_argument("--seed", type=int, help="the same seed gives the same sound")
    t2a.add_argument("--model", default="tangoflux", help="the daemon (default: tangoflux)")
    t2a.add_argument("--timeout", type=float, default=600.0)
    t2a.set_defaults(handler=cmd_text_to_audio)

    head = sub.add_parser("talking-head", help="an mp4 of a TalkingGaussian subject saying "
                                               "AUDIO")
    client_options(head)
    head.add_argument("audio", help="a WAV/FLAC file of speech")
    head.add_argument("-o", "--output", required=True, help="the mp4 to write")
    head.add_argument("--model", default="talkinggaussian",
                      help="the daemon of the subject (default: talkinggaussian)")
    head.add_argument("--timeout", type=float, default=600.0)
    head.set_defaults(handler=cmd_talking_head)

    from modelhost.pipelines import drama_cli  # declares arguments only: no heavy import

    drama = sub.add_parser("audio-drama", help="an audio drama from a JSON script: dialogue, "
                                               "ambience and effects mixed into one file")
    client_options(drama)
    drama_cli.add_arguments(drama)
    drama.set_defaults(handler=cmd_audio_drama)

    from modelhost.pipelines import chat_cli  # declares arguments only: no heavy import

    chat = sub.add_parser("chat", help="a voice chat: speech or text in, a language model's "
                                       "reply spoken (and a talking head) out, streamed")
    client_options(chat)
    chat_cli.add_arguments(chat)
    chat.set_defaults(handler=cmd_chat)
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
