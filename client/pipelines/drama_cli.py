"""`modelhost audio-drama SCRIPT.json -o out.wav`: the command-line face of the drama pipeline.

Its arguments are declared here (no heavy import: the parser is built on
every `modelhost` command), the pipeline is imported when the verb runs.
Progress: one bar per stage and one per item in flight, with rich on a
terminal; one line per finished item otherwise. Exit status: 0 when the mix
was written, 1 when an item failed (each listed with its place in the
script) or the broker could not be reached, 2 for a script that is not valid.
"""

import json
import sys

EXIT_FAILED = 1
EXIT_USAGE = 2


def add_arguments(parser):
    parser.add_argument("script", metavar="SCRIPT.json",
                        help="the drama's script (format: README, or the docstring of "
                             "modelhost.pipelines.script)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the mix to write (.wav, .flac)")
    parser.add_argument("--stems", metavar="DIR",
                        help="also write dialogue.wav, ambience.wav, effects.wav here")
    parser.add_argument("--timeline", metavar="FILE",
                        help="where every line and sound went, as JSON (default: beside "
                             "the output, NAME.timeline.json)")
    parser.add_argument("--cache", metavar="DIR",
                        help="finished items by content (default: "
                             "~/.cache/modelhost/audio-drama)")
    parser.add_argument("--no-cache", action="store_true",
                        help="generate everything again and keep nothing")
    parser.add_argument("--tts", default="espeak", metavar="MODEL",
                        help="the TTS daemon (default: espeak)")
    parser.add_argument("--tts-method", default="tts", metavar="METHOD",
                        help="its operation (default: tts)")
    parser.add_argument("--sfx", default="tangoflux", metavar="MODEL",
                        help="the text-to-audio daemon for ambience and effects "
                             "(default: tangoflux)")
    parser.add_argument("--sfx-method", default="generate", metavar="METHOD",
                        help="its operation (default: generate)")
    parser.add_argument("--sfx-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra argument of every text-to-audio call, e.g. steps=25 "
                             "(a JSON value, else a string; repeatable)")
    parser.add_argument("--workers", type=int, default=64, metavar="N",
                        help="calls outstanding at once (default 64)")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="further tries of a failed item (default 2)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="seconds per call (default: no limit)")
    parser.add_argument("--rate", type=int, default=44100, metavar="HZ",
                        help="the output sample rate (default 44100)")
    parser.add_argument("--dialogue-lufs", type=float, default=-16.0, metavar="LUFS")
    parser.add_argument("--ambience-lufs", type=float, default=-30.0, metavar="LUFS")
    parser.add_argument("--effects-lufs", type=float, default=-22.0, metavar="LUFS")
    parser.add_argument("--duck-db", type=float, default=10.0, metavar="DB",
                        help="how far ambience goes down under speech (default 10; 0: off)")
    parser.add_argument("--ceiling", type=float, default=-1.0, metavar="DBTP",
                        help="the limiter's true-peak ceiling (default -1)")


def _value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def options_of(args, endpoint):
    from .drama import DramaOptions

    sfx_arguments = {}
    for item in args.sfx_arg:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError("--sfx-arg takes KEY=VALUE, not {!r}".format(item))
        sfx_arguments[key] = _value(value)
    return DramaOptions(
        tts_model=args.tts, tts_method=args.tts_method, sfx_model=args.sfx,
        sfx_method=args.sfx_method, sfx_arguments=sfx_arguments, workers=args.workers,
        retries=args.retries, timeout=args.timeout, endpoint=endpoint,
        cache_dir=args.cache, use_cache=not args.no_cache, sample_rate=args.rate,
        dialogue_lufs=args.dialogue_lufs, ambience_lufs=args.ambience_lufs,
        effects_lufs=args.effects_lufs, duck_db=args.duck_db, ceiling_dbtp=args.ceiling)


class PlainProgress(object):
    """One line per finished, retried or failed item on stderr (not a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream

    def __call__(self, event):
        if event.kind in ("item_done", "item_cached", "item_failed"):
            word = {"item_done": "generated", "item_cached": "cached",
                    "item_failed": "FAILED"}[event.kind]
            self._print("[{} {}/{}] {} {}".format(event.stage, event.done, event.total, word,
                                                  event.item.label))
        elif event.kind == "item_retry":
            self._print("[{}] retrying {} after try {}: {}".format(
                event.stage, event.item.label, event.attempt, event.error))
        elif event.kind == "mix" and event.message != "done":
            self._print("[mix] {}".format(event.message))

    def _print(self, line):
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        pass


class RichProgress(object):
    """A bar per stage, and one per item in flight (the daemon's own progress)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TaskProgressColumn(), TextColumn("{task.fields[note]}"),
                                 TimeElapsedColumn(), console=Console(stderr=True))
        self.stages = {}
        self.items = {}  # Item -> task id (an item's events all come from one thread)
        self.progress.start()

    def __call__(self, event):
        progress = self.progress
        if event.kind == "stage_start":
            self.stages[event.stage] = progress.add_task(
                "{:<9}".format(event.stage), total=max(1, event.total), note="",
                visible=event.total > 0 or event.stage == "mix")
        elif event.kind == "item_start":
            note = "try {}".format(event.attempt) if event.attempt > 1 else ""
            task = self.items.get(event.item)
            if task is None:
                self.items[event.item] = progress.add_task("  " + event.item.label, total=1.0,
                                                           note=note)
            else:
                progress.update(task, completed=0, note=note)
        elif event.kind == "item_progress":
            task = self.items.get(event.item)
            if task is not None and event.fraction is not None:
                progress.update(task, completed=event.fraction)
        elif event.kind == "item_retry":
            progress.console.print("retrying {} after try {}: {}".format(
                event.item.label, event.attempt, event.error))
        elif event.kind in ("item_done", "item_cached", "item_failed"):
            task = self.items.pop(event.item, None)
            if task is not None:
                progress.remove_task(task)
            if event.kind == "item_failed":
                progress.console.print("[red]FAILED[/red] {}: {}".format(event.item.label,
                                                                         event.error))
            progress.update(self.stages[event.stage], completed=event.done)
        elif event.kind == "mix":
            if "mix" not in self.stages:
                self.stages["mix"] = progress.add_task("mix      ", total=4, note="")
            steps = {"timeline": 1, "mixing": 2, "writing": 3, "done": 4}
            progress.update(self.stages["mix"], completed=steps.get(event.message, 0),
                            note=event.message if event.message != "done" else "")

    def close(self):
        self.progress.stop()


def _progress():
    if sys.stderr.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()


def _summary(result):
    lines = []
    loud = result.loudness
    lines.append("wrote {}: {:.1f} s, {} Hz stereo, {} LUFS, true peak {} dBTP (limiter: "
                 "{:.1f} dB at most)".format(result.output, result.duration_s,
                                             result.timeline["sample_rate"], loud.get("mix"),
                                             result.true_peak_dbtp,
                                             result.limiter_reduction_db))
    if result.stems:
        lines.append("stems: " + ", ".join("{} {} ({} LUFS)".format(stage, path, loud[stage])
                                           for stage, path in result.stems.items()))
    lines.append("timeline: {}".format(result.timeline_path))
    lines.append(_counts(result))
    return "\n".join(lines)


def _counts(result):
    return "items: {} ({} generated, {} cached, {} failed), {} daemon call{}; {}".format(
        result.items, result.generated, result.cached, len(result.failures), result.calls,
        "" if result.calls == 1 else "s",
        ", ".join("{} {:.1f} s".format(stage, seconds)
                  for stage, seconds in result.seconds.items()))


def run(args, endpoint):
    try:
        from .drama import render_drama
        from .script import ScriptError, load_script
    except ImportError as exc:
        print("modelhost: audio-drama needs the pipelines extra ({}): pip install "
              "'modelhost[pipelines]'".format(exc), file=sys.stderr)
        return EXIT_FAILED
    try:
        script = load_script(args.script)
    except ScriptError as exc:
        print("modelhost: {}".format(exc), file=sys.stderr)
        return EXIT_USAGE
    options = options_of(args, endpoint)
    progress = _progress()
    try:
        result = render_drama(script, args.output, stems_dir=args.stems,
                              timeline_path=args.timeline, options=options,
                              on_event=progress)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result.as_dict(), default=str))
    if not result.ok:
        print("modelhost: {} of {} item{} failed, so nothing was mixed (what finished is "
              "cached: a re-run redoes only these):".format(
                  len(result.failures), result.items, "" if result.items == 1 else "s"),
              file=sys.stderr)
        for failure in result.failures:
            print("  {}".format(failure), file=sys.stderr)
        print(_counts(result), file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print(_summary(result))
    return 0
