"""The audio drama pipeline: a JSON script (scenes, dialogue, ambience, effects) to one mix.

    from modelhost.pipelines import DramaOptions, render_drama
    result = render_drama("drama.json", "drama.wav", stems_dir="stems",
                          options=DramaOptions(tts_model="espeak", sfx_model="tangoflux"))
    if not result.ok:
        for failure in result.failures:
            print(failure)

or `modelhost audio-drama drama.json -o drama.wav --stems stems`. The script
format is described in `modelhost.pipelines.script`.

How a run goes:

1. Items. Every dialogue line is a TTS call (`tts_model`.`tts_method`, default
   the embedded espeak daemon's `tts`, with `text`, `voice` and the line's
   options); every scene's ambience and every effect a text-to-audio call
   (`sfx_model`.`sfx_method`, default TangoFlux's `generate`, with `prompt`,
   `duration` and a `seed`: the script's, else one derived from the prompt, so
   the same script gives the same sound and its items can be cached).
2. Generation. Items found in the cache are not sent. The rest are submitted
   together at `batch` priority from `workers` threads, one Client each, so
   that both daemons have work waiting from the start: the broker runs them
   side by side when both fit under its memory threshold and serializes them
   when they do not. There is no lock in this client. They are submitted in
   stage order (all dialogue, then ambience, then effects): the broker serves
   requests of one priority by arrival, so when the daemons must take turns
   this order makes it swap once, where interleaved kinds make it swap back
   and forth (bench/drama.py measures both). A failed item is tried again up
   to `retries` times (errors that resending cannot fix, such as bad
   arguments or an unknown model, are not retried), then reported with its
   place in the script.
3. Timeline, from the real durations of the generated speech (leading and
   trailing silence trimmed): per scene a lead-in, each line then its pause,
   a tail; ambience under the whole scene, looped or cut to its length;
   effects at their times, from a line's start or end or the scene's start.
   Written as JSON beside the mix.
4. Mix, at one output rate (soxr resampling): each line, effect and ambience
   normalized to its layer's loudness (LUFS, pyloudnorm), dialogue panned per
   speaker, ambience ducked under the dialogue (a sidechain envelope with
   look-ahead, attack, hold, release) with fades at scene edges, each stem
   normalized to its target, then summed and limited so that the true peak
   stays under the ceiling (-1 dBTP by default). Stems (dialogue, ambience,
   effects) are the layers as they enter the limiter, as float WAV files.

Progress: `on_event(DramaEvent)` is called for each stage and item (from the
worker threads for an item's progress and retries, so the callback must be
thread-safe, as rich's Progress is).

Items are cached by content: the file name is a hash of (model, method,
arguments), so a re-run sends nothing for what it already has. Two daemons
under the same name with different weights would share entries: use another
cache dir (or `use_cache=False`) when the model behind a name changes.
"""

import collections
import concurrent.futures
import hashlib
import json
import math
import os
import tempfile
import threading
import time

import numpy

from .. import protocol
from .._client import Client
from ..errors import ModelhostError, RequestError
from . import mixing
from .script import Script, load_script

__all__ = ["DramaOptions", "DramaEvent", "DramaResult", "Failure", "Item", "render_drama",
           "plan_items", "build_timeline", "default_cache_dir"]

STAGES = ("dialogue", "ambience", "effects")
MIX_STAGE = "mix"
SEED_RANGE = 2**31  # seeds derived from prompts stay short enough to type back


def default_cache_dir():
    """$MODELHOST_CACHE_DIR/audio-drama, else $XDG_CACHE_HOME/modelhost/audio-drama, else
    ~/.cache/modelhost/audio-drama."""
    if os.environ.get("MODELHOST_CACHE_DIR"):
        return os.path.join(os.environ["MODELHOST_CACHE_DIR"], "audio-drama")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "modelhost", "audio-drama")


class DramaOptions(object):
    """Settings of a run; every one has a default (keyword arguments only)."""

    _DEFAULTS = collections.OrderedDict([
        # Which daemons, and what they are asked.
        ("tts_model", "espeak"),
        ("tts_method", "tts"),
        ("sfx_model", "tangoflux"),
        ("sfx_method", "generate"),
        ("sfx_arguments", None),  # extra arguments of every text-to-audio call: {"steps": 25}
        ("ambience_seconds", 10.0),  # generated per scene, then looped or cut
        ("effect_seconds", 2.0),  # generated per effect unless the script says
        # Generation.
        # Calls outstanding at once, one Client and thread each: best when every item
        # is (keep it within the daemons' max_queue, 64 by default).
        ("workers", 64),
        # "by_kind": all dialogue, then ambience, then effects; or "interleaved".
        ("order", "by_kind"),
        ("retries", 2),  # further tries of a failed item
        ("retry_delay_s", 0.5),  # times the try's number
        ("timeout", None),  # seconds per call, None: no limit
        ("priority", protocol.Priority.BATCH),
        ("endpoint", None),  # None: $MODELHOST_ENDPOINT or the runtime dir's socket
        ("cache_dir", None),  # None: default_cache_dir()
        ("use_cache", True),
        # Mixing.
        ("sample_rate", 44100),
        ("dialogue_lufs", -16.0),
        ("ambience_lufs", -30.0),
        ("effects_lufs", -22.0),
        ("duck_db", 10.0),
        ("duck_threshold_db", -45.0),  # dialogue RMS (dBFS) that counts as speech
        ("duck_attack_s", 0.08),
        ("duck_release_s", 0.4),
        ("duck_hold_s", 0.15),
        ("ambience_fade_s", 1.0),  # in and out at each scene's edges
        ("loop_crossfade_s", 0.5),  # at the seams of looped ambience
        ("edge_fade_s", 0.005),  # on each line and effect, against clicks
        ("trim_db", -60.0),  # silence (relative to a clip's peak) trimmed off speech/effects
        ("ceiling_dbtp", -1.0),
        ("subtype", "PCM_24"),  # of the mix; stems are float
    ])

    def __init__(self, **settings):
        unknown = [name for name in settings if name not in self._DEFAULTS]
        if unknown:
            raise TypeError("unknown DramaOptions: {}; known: {}".format(
                ", ".join(unknown), ", ".join(self._DEFAULTS)))
        for name, default in self._DEFAULTS.items():
            setattr(self, name, settings.get(name, default))
        if self.order not in ("interleaved", "by_kind"):
            raise ValueError("order must be 'interleaved' or 'by_kind', not {!r}".format(
                self.order))
        if int(self.workers) < 1 or int(self.retries) < 0:
            raise ValueError("workers must be at least 1 and retries at least 0")
        self.sfx_arguments = dict(self.sfx_arguments or {})

    def as_dict(self):
        return {name: getattr(self, name) for name in self._DEFAULTS}


# kind: stage_start (total), stage_done, item_start, item_progress (fraction,
# message), item_cached, item_retry (attempt, error), item_done, item_failed (error),
# mix (message). `item` is an Item or None; done/total count the stage's items.
DramaEvent = collections.namedtuple(
    "DramaEvent", "kind stage item done total fraction message attempt error")


def _event(kind, stage, item=None, done=None, total=None, fraction=None, message=None,
           attempt=None, error=None):
    return DramaEvent(kind, stage, item, done, total, fraction, message, attempt, error)


class Item(object):
    """One daemon call of the run, with the place in the script it comes from."""

    def __init__(self, stage, source, model, method, arguments):
        self.stage = stage
        self.source = source  # a script Line, Ambience or Effect
        self.model = model
        self.method = method
        self.arguments = arguments
        self.key = hashlib.sha256(json.dumps(
            {"model": model, "method": method, "arguments": arguments}, sort_keys=True,
            separators=(",", ":")).encode("utf-8")).hexdigest()

    @property
    def where(self):
        return self.source.where

    @property
    def text(self):
        """What the item says or describes: the line's words, or the sound's prompt."""
        return getattr(self.source, "text", None) or self.source.prompt

    @property
    def label(self):
        who = " ({})".format(self.source.speaker) if self.stage == "dialogue" else ""
        text = self.text if len(self.text) <= 48 else self.text[:45] + "..."
        return "{}{}: {!r}".format(self.where, who, text)


class Failure(object):
    def __init__(self, item, error, attempts, retried):
        self.item = item
        self.error = error
        self.attempts = attempts
        self.retried = retried

    def as_dict(self):
        source = self.item.source
        return {"stage": self.item.stage, "where": self.item.where, "scene": source.scene,
                "line": getattr(source, "index", None) if self.item.stage == "dialogue"
                else None,
                "effect": source.index if self.item.stage == "effects" else None,
                "text": self.item.text, "model": self.item.model, "method": self.item.method,
                "error": str(self.error), "attempts": self.attempts}

    def __str__(self):
        return "{} {!r}: {} ({} attempt{}{})".format(
            self.item.where + (" ({})".format(self.item.source.speaker)
                               if self.item.stage == "dialogue" else ""),
            self.item.text, self.error, self.attempts, "" if self.attempts == 1 else "s",
            "" if self.retried else "; not retried: resending cannot fix it")


class DramaResult(object):
    """What a run did. `ok` is False when any item failed; then nothing was mixed."""

    def __init__(self):
        self.ok = False
        self.output = None
        self.stems = {}
        self.timeline_path = None
        self.timeline = None
        self.duration_s = None
        self.loudness = {}  # stem or "mix" -> integrated LUFS as written
        self.true_peak_dbtp = None
        self.limiter_reduction_db = None
        self.items = 0
        self.generated = 0
        self.cached = 0
        self.calls = 0  # daemon calls made, retries included
        self.failures = []
        self.seconds = {}  # stage -> wall time: generate, mix, write

    def as_dict(self):
        return {"ok": self.ok, "output": self.output, "stems": self.stems,
                "timeline": self.timeline_path, "duration_s": self.duration_s,
                "loudness_lufs": self.loudness, "true_peak_dbtp": self.true_peak_dbtp,
                "limiter_reduction_db": self.limiter_reduction_db,
                "items": {"total": self.items, "generated": self.generated,
                          "cached": self.cached, "failed": len(self.failures)},
                "calls": self.calls, "failures": [f.as_dict() for f in self.failures],
                "seconds": self.seconds}


# --- items -------------------------------------------------------------------------------

def _seed_of(prompt):
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12], 16) % SEED_RANGE


def plan_items(script, options):
    """Every daemon call the script needs, in script order, each kind in its stage."""
    items = []
    for scene in script.scenes:
        for line in scene.lines:
            arguments = dict(line.options)
            arguments["text"] = line.text
            if line.voice:
                arguments["voice"] = line.voice
            items.append(Item("dialogue", line, options.tts_model, options.tts_method,
                              arguments))
        if scene.ambience is not None:
            items.append(Item("ambience", scene.ambience, options.sfx_model,
                              options.sfx_method, _sfx_arguments(
                                  scene.ambience, options.ambience_seconds, options)))
        for effect in scene.effects:
            items.append(Item("effects", effect, options.sfx_model, options.sfx_method,
                              _sfx_arguments(effect, options.effect_seconds, options)))
    return items


def _sfx_arguments(source, default_seconds, options):
    arguments = dict(options.sfx_arguments)
    arguments.update(prompt=source.prompt, duration=float(source.duration or default_seconds),
                     seed=source.seed if source.seed is not None else _seed_of(source.prompt))
    return arguments


def _submission_order(items, order):
    """Stage after stage (by_kind), or round-robin over the stages (interleaved)."""
    if order == "by_kind":
        return sorted(items, key=lambda item: STAGES.index(item.stage))
    queues = [collections.deque(i for i in items if i.stage == stage) for stage in STAGES]
    ordered = []
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.popleft())
    return ordered


# --- audio from a daemon's result ---------------------------------------------------------

def decode_audio(result):
    """(float32 frames (n, channels), sample rate) from a TTS or text-to-audio result:
    {"audio": bytes (format "s16le" or "f32le") or an array, "sample_rate", "channels"}."""
    if not isinstance(result, dict) or "audio" not in result or "sample_rate" not in result:
        raise ValueError("the result has no audio and sample_rate: {}".format(
            sorted(result) if isinstance(result, dict) else type(result).__name__))
    audio, rate = result["audio"], int(result["sample_rate"])
    channels = int(result.get("channels") or 1)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        kind = result.get("format", "s16le")
        if kind == "s16le":
            samples = numpy.frombuffer(audio, dtype="<i2").astype(numpy.float32) / 32768.0
        elif kind == "f32le":
            samples = numpy.frombuffer(audio, dtype="<f4").astype(numpy.float32)
        else:
            raise ValueError("audio format {!r} is not one of s16le, f32le".format(kind))
    else:
        samples = numpy.asarray(audio)
        if samples.dtype.kind in "iu":
            scale = float(2 ** (8 * samples.dtype.itemsize - 1))
            samples = samples.astype(numpy.float32) / scale
        samples = samples.astype(numpy.float32)
    if samples.ndim == 1:
        samples = samples[:len(samples) - len(samples) % channels].reshape(-1, channels)
    return numpy.ascontiguousarray(samples, dtype=numpy.float32), rate


# --- the cache ---------------------------------------------------------------------------

class Cache(object):
    """Finished items by key: <dir>/<key[:2]>/<key>.npz (samples, rate, what it was)."""

    def __init__(self, directory, enabled=True):
        self.directory = directory
        self.enabled = enabled

    def _path(self, key):
        return os.path.join(self.directory, key[:2], key + ".npz")

    def get(self, item):
        if not self.enabled:
            return None
        path = self._path(item.key)
        try:
            with numpy.load(path, allow_pickle=False) as data:
                return numpy.array(data["samples"], dtype=numpy.float32), int(data["rate"])
        except (OSError, KeyError, ValueError):
            return None  # absent or unreadable: generated again, then rewritten

    def put(self, item, samples, rate):
        if not self.enabled:
            return
        path = self._path(item.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        meta = json.dumps({"model": item.model, "method": item.method,
                           "arguments": item.arguments, "where": item.where})
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz",
                                             dir=os.path.dirname(path))
        try:
            with os.fdopen(handle, "wb") as out:
                numpy.savez(out, samples=samples, rate=numpy.int64(rate),
                            meta=numpy.array(meta))
            os.replace(temporary, path)  # atomic: a reader sees all of it or nothing
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise


# --- generation --------------------------------------------------------------------------

class _Outcome(object):
    def __init__(self, item, samples=None, rate=None, cached=False, attempts=0, error=None,
                 retried=True):
        self.item = item
        self.samples = samples
        self.rate = rate
        self.cached = cached
        self.attempts = attempts
        self.error = error
        self.retried = retried


class _Generator(object):
    """Runs the items on `workers` threads, each with its own Client."""

    def __init__(self, options, cache, on_event):
        self.options = options
        self.cache = cache
        self.on_event = on_event
        self._local = threading.local()
        self._clients = []  # list.append is atomic: closed at the end

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = Client(self.options.endpoint)
            self._local.client = client
            self._clients.append(client)
        return client

    def close(self):
        for client in self._clients:
            client.close()

    def run_one(self, item):
        options = self.options
        attempt = 0
        while True:
            attempt += 1
            self.on_event(_event("item_start", item.stage, item, attempt=attempt))

            def progress(report, item=item):
                self.on_event(_event("item_progress", item.stage, item,
                                     fraction=report.fraction,
                                     message=" ".join(filter(None, [report.stage,
                                                                    report.message]))))
            try:
                result = self._client().call(item.model, item.method, timeout=options.timeout,
                                             on_progress=progress, priority=options.priority,
                                             arguments=item.arguments)
                samples, rate = decode_audio(result)
                if len(samples) == 0:
                    raise ValueError("the daemon returned no audio")
            except RequestError as exc:  # resending cannot fix it
                return _Outcome(item, attempts=attempt, error=exc, retried=False)
            except (ModelhostError, ValueError) as exc:
                if attempt > options.retries:
                    return _Outcome(item, attempts=attempt, error=exc)
                self.on_event(_event("item_retry", item.stage, item, attempt=attempt,
                                     error=exc))
                time.sleep(options.retry_delay_s * attempt)
                continue
            self.cache.put(item, samples, rate)
            return _Outcome(item, samples, rate, attempts=attempt)


def _generate(items, options, cache, on_event, result):
    """({key: _Outcome}, [failed _Outcome]): from the cache, else from the daemons."""
    totals = collections.Counter(item.stage for item in items)
    done = collections.Counter()
    for stage in STAGES:
        on_event(_event("stage_start", stage, total=totals[stage], done=0))
        if totals[stage] == 0:
            on_event(_event("stage_done", stage, done=0, total=0))
    outcomes = {}

    def finished(item, outcome):
        stage = item.stage
        done[stage] += 1
        kind = "item_failed" if outcome.error is not None else (
            "item_cached" if outcome.cached or outcome.item is not item else "item_done")
        on_event(_event(kind, stage, item, done=done[stage], total=totals[stage],
                        attempt=outcome.attempts, error=outcome.error))
        if done[stage] == totals[stage]:
            on_event(_event("stage_done", stage, done=done[stage], total=totals[stage]))

    # The same call twice in a script (a repeated line, a recurring effect) is made once.
    first_of = collections.OrderedDict()
    for item in _submission_order(items, options.order):
        first_of.setdefault(item.key, item)
    to_run = []
    for key, item in first_of.items():
        hit = cache.get(item)
        if hit is None:
            to_run.append(item)
        else:
            outcomes[key] = _Outcome(item, hit[0], hit[1], cached=True)
            finished(item, outcomes[key])
    generator = _Generator(options, cache, on_event)
    try:
        if to_run:
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(int(options.workers), len(to_run)),
                    thread_name_prefix="drama") as pool:
                futures = [pool.submit(generator.run_one, item) for item in to_run]
                for future in concurrent.futures.as_completed(futures):
                    outcome = future.result()
                    result.calls += outcome.attempts
                    outcomes[outcome.item.key] = outcome
                    finished(outcome.item, outcome)
    finally:
        generator.close()
    for item in items:
        if first_of[item.key] is not item:
            finished(item, outcomes[item.key])
    failed = [outcome for outcome in outcomes.values() if outcome.error is not None]
    return outcomes, failed


# --- the timeline ------------------------------------------------------------------------

def _speech_clip(samples, rate, options):
    """Dialogue or an effect at the output rate, leading and trailing silence cut."""
    frames = mixing.resample(samples, rate, options.sample_rate)
    trimmed, _cut = mixing.trim_silence(frames, options.sample_rate, options.trim_db)
    return trimmed


def build_timeline(script, clips, options):
    """Where everything goes, from the clips' real lengths (frames at the output rate).

    `clips` maps each line, ambience and effect (the script objects) to its
    frames. Returns the timeline as a JSON-ready dict; times in seconds, with
    the frame each one starts at.
    """
    rate = options.sample_rate
    scenes = []
    cursor = 0  # frames: where the scene starts

    def frames(seconds):
        return int(round(seconds * rate))

    for scene in script.scenes:
        lines, position = [], frames(scene.lead_in)
        for number, line in enumerate(scene.lines):
            length = len(clips[line])
            lines.append({"index": line.index, "speaker": line.speaker, "text": line.text,
                          "voice": line.voice, "pan": line.pan, "start_frame": position,
                          "frames": length})
            position += length
            if number < len(scene.lines) - 1:
                position += frames(scene.gap if line.pause_after is None else line.pause_after)
        end = position + frames(scene.tail) if scene.lines else 0
        effects = []
        for effect in scene.effects:
            if effect.line is None:
                anchor, anchor_name = 0, "scene start"
            else:
                placed = lines[effect.line]
                anchor = placed["start_frame"] + (placed["frames"] if effect.anchor == "end"
                                                  else 0)
                anchor_name = "line {} {}".format(effect.line, effect.anchor)
            start = anchor + frames(effect.at)
            clamped = start < 0
            start = max(0, start)
            length = len(clips[effect])
            effects.append({"index": effect.index, "prompt": effect.prompt, "at": effect.at,
                            "anchor": anchor_name, "clamped": clamped, "start_frame": start,
                            "frames": length, "gain_db": effect.gain_db})
            end = max(end, start + length)
        end = max(end, frames(scene.min_duration))
        ambience = None
        if scene.ambience is not None:
            ambience = {"prompt": scene.ambience.prompt, "start_frame": 0, "frames": end,
                        "generated_s": len(clips[scene.ambience]) / float(rate),
                        "gain_db": scene.ambience.gain_db}
        scenes.append({"index": scene.index, "name": scene.name, "start_frame": cursor,
                       "frames": end, "ambience": ambience, "lines": lines,
                       "effects": effects})
        cursor += end
    # Scene-relative frames become absolute, and every entry gets seconds too.
    for scene in scenes:
        offset = scene["start_frame"]
        for entry in ([scene["ambience"]] if scene["ambience"] else []) + scene["lines"] \
                + scene["effects"]:
            entry["start_frame"] += offset
        for entry in [scene] + ([scene["ambience"]] if scene["ambience"] else []) \
                + scene["lines"] + scene["effects"]:
            entry["start"] = round(entry["start_frame"] / float(rate), 6)
            entry["end"] = round((entry["start_frame"] + entry["frames"]) / float(rate), 6)
            entry["duration"] = round(entry["frames"] / float(rate), 6)
    return {"title": script.title, "sample_rate": rate, "frames": cursor,
            "duration": round(cursor / float(rate), 6), "scenes": scenes}


# --- the mix -----------------------------------------------------------------------------

def _normalized(frames, rate, target_lufs, gain_db=0.0):
    level, _gain = mixing.normalize_loudness(frames, rate, target_lufs)
    return level * numpy.float32(mixing.db_to_gain(gain_db)) if gain_db else level


def mix_timeline(script, timeline, clips, options):
    """(stems {name: frames (n, 2)}, mix (n, 2), limiter's largest reduction in dB)."""
    rate, total = options.sample_rate, timeline["frames"]
    stems = {stage: numpy.zeros((total, 2), dtype=numpy.float32) for stage in STAGES}
    edge = options.edge_fade_s
    for scene, placed in zip(script.scenes, timeline["scenes"]):
        for line, entry in zip(scene.lines, placed["lines"]):
            voice = _normalized(clips[line], rate, options.dialogue_lufs, line.gain_db)
            voice = mixing.fade(mixing.to_stereo(voice, line.pan), rate, edge, edge)
            mixing.place(stems["dialogue"], voice, entry["start_frame"])
        for effect, entry in zip(scene.effects, placed["effects"]):
            sound = _normalized(clips[effect], rate, options.effects_lufs, effect.gain_db)
            sound = mixing.fade(mixing.to_stereo(sound), rate, edge, edge)
            mixing.place(stems["effects"], sound, entry["start_frame"])
        if scene.ambience is not None and placed["frames"]:
            bed = _normalized(mixing.to_stereo(clips[scene.ambience]), rate,
                              options.ambience_lufs, scene.ambience.gain_db)
            bed = mixing.loop_to_length(bed, rate, placed["frames"], options.loop_crossfade_s)
            bed = mixing.fade(bed, rate, options.ambience_fade_s, options.ambience_fade_s)
            mixing.place(stems["ambience"], bed, placed["start_frame"])
    if options.duck_db > 0:
        gain = mixing.duck_gain(stems["dialogue"], rate, options.duck_db,
                                options.duck_threshold_db, options.duck_attack_s,
                                options.duck_release_s, options.duck_hold_s)
        stems["ambience"] *= gain[:, None]
    targets = {"dialogue": options.dialogue_lufs, "ambience": options.ambience_lufs,
               "effects": options.effects_lufs}
    for stage in STAGES:
        stems[stage], _gain = mixing.normalize_loudness(stems[stage], rate, targets[stage])
    bus = stems["dialogue"] + stems["ambience"] + stems["effects"]
    mix, reduction = mixing.limit(bus, rate, options.ceiling_dbtp)
    return stems, mix, reduction


def _write(path, frames, rate, subtype):
    import soundfile

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    soundfile.write(path, frames, rate, subtype=subtype)


def render_drama(script, output, stems_dir=None, timeline_path=None, options=None,
                 on_event=None):
    """Generate, place and mix `script` (a path, JSON text, a dict or a Script) into
    `output`; returns a DramaResult. ScriptError for a script that cannot be performed.

    `timeline_path` defaults to the output's name with `.timeline.json`.
    Nothing is mixed when an item failed (result.ok False, result.failures
    say which and why); what did finish is cached, so a re-run redoes only the
    failures.
    """
    options = options or DramaOptions()
    on_event = on_event or (lambda event: None)
    if not isinstance(script, Script):
        script = load_script(script)
    result = DramaResult()
    items = plan_items(script, options)
    result.items = len(items)
    cache = Cache(options.cache_dir or default_cache_dir(), options.use_cache)

    started = time.monotonic()
    outcomes, _failed = _generate(items, options, cache, on_event, result)
    result.seconds["generate"] = round(time.monotonic() - started, 3)
    result.cached = sum(1 for o in outcomes.values() if o.cached and o.error is None)
    result.generated = sum(1 for o in outcomes.values() if not o.cached and o.error is None)
    for item in items:  # every place in the script a failed call was for
        outcome = outcomes[item.key]
        if outcome.error is not None:
            result.failures.append(Failure(item, outcome.error, outcome.attempts,
                                           outcome.retried))
    if result.failures:
        return result

    started = time.monotonic()
    on_event(_event("mix", MIX_STAGE, message="timeline"))
    clips = {}
    for item in items:
        outcome = outcomes[item.key]
        if item.stage == "ambience":
            clips[item.source] = mixing.resample(outcome.samples, outcome.rate,
                                                 options.sample_rate)
        else:
            clips[item.source] = _speech_clip(outcome.samples, outcome.rate, options)
    timeline = build_timeline(script, clips, options)
    on_event(_event("mix", MIX_STAGE, message="mixing"))
    stems, mix, reduction = mix_timeline(script, timeline, clips, options)
    result.seconds["mix"] = round(time.monotonic() - started, 3)

    started = time.monotonic()
    on_event(_event("mix", MIX_STAGE, message="writing"))
    rate = options.sample_rate
    result.output = str(output)
    _write(result.output, mix, rate, options.subtype)
    if stems_dir is not None:
        for stage in STAGES:
            path = os.path.join(str(stems_dir), stage + ".wav")
            _write(path, stems[stage], rate, "FLOAT")
            result.stems[stage] = path
    result.loudness = {stage: _rounded(mixing.loudness(stems[stage], rate))
                       for stage in STAGES}
    result.loudness["mix"] = _rounded(mixing.loudness(mix, rate))
    result.true_peak_dbtp = _rounded(mixing.true_peak_db(mix))
    result.limiter_reduction_db = round(reduction, 2)
    result.duration_s = timeline["duration"]
    timeline["loudness_lufs"] = result.loudness
    timeline["true_peak_dbtp"] = result.true_peak_dbtp
    timeline["options"] = {name: value for name, value in options.as_dict().items()
                           if name not in ("endpoint", "cache_dir")}
    result.timeline = timeline
    result.timeline_path = str(timeline_path or (os.path.splitext(result.output)[0]
                                                  + ".timeline.json"))
    with open(result.timeline_path, "w") as handle:
        json.dump(timeline, handle, indent=1)
    result.seconds["write"] = round(time.monotonic() - started, 3)
    result.ok = True
    on_event(_event("mix", MIX_STAGE, message="done"))
    return result


def _rounded(value):
    return round(value, 2) if math.isfinite(value) else None
