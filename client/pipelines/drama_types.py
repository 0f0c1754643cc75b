"""The audio drama's run settings and reports: DramaOptions (every setting of a run, with
its default), DramaEvent (what on_event is told), Item (one daemon call and the place
in the script it is for), Failure and DramaResult, with the stage names and
default_cache_dir. Split out of drama.py (issue 13); drama.py re-exports the public
names.
"""

import collections
import hashlib
import json
import os

from .. import protocol

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
