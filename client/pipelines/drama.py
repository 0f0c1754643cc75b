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

The pieces live in modules of their own (issue 13): drama_types.py (DramaOptions,
DramaEvent, Item, Failure, DramaResult), drama_generate.py (plan_items,
decode_audio, Cache, the generation on worker threads), drama_mix.py
(build_timeline, mix_timeline). This module keeps render_drama, which runs them in
turn, and re-exports the public names.
"""

import json
import math
import os
import time

from . import mixing
from .drama_generate import Cache, _generate, decode_audio, plan_items  # noqa: F401
from .drama_mix import _speech_clip, _write, build_timeline, mix_timeline  # noqa: F401
from .drama_types import (MIX_STAGE, SEED_RANGE, STAGES, DramaEvent, DramaOptions,  # noqa: F401
                          DramaResult, Failure, Item, _event, default_cache_dir)
from .script import Script, load_script

__all__ = ["DramaOptions", "DramaEvent", "DramaResult", "Failure", "Item", "render_drama",
           "plan_items", "build_timeline", "default_cache_dir"]


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
