"""The audio drama's timeline and mix: the speech clips trimmed at the output rate
(_speech_clip), where every line, ambience and effect goes (build_timeline), the
layers mixed, ducked and limited (mix_timeline), and the WAV writer (_write). Split
out of drama.py unchanged (issue 13).
"""

import os

import numpy

from . import mixing
from .drama_types import STAGES

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
