"""The audio drama's script: a JSON file of scenes, read and checked here.

The format (every key not marked required is optional; times are seconds,
levels dB, `pan` from -1 left to 1 right):

    {
      "title": "The Lighthouse",
      "speakers": {                          # default voice and placement per speaker
        "Keeper": {"voice": "en-gb", "pan": -0.3, "gain_db": 0,
                   "options": {"rate": 160}},   # extra arguments of the TTS call
        "Mara":   {"voice": "en-us", "pan": 0.3}
      },
      "scenes": [                            # required, at least one
        {
          "name": "The storm",
          "ambience": "wind around a stone tower, waves below",   # or an object:
              # {"prompt": str (required), "duration": 10, "seed": 7, "gain_db": 0}
              # `duration` is what is generated; it is looped or cut to the scene
          "lead_in": 1.0,                    # ambience alone before the first line
          "gap": 0.5,                        # pause after each line (pause_after wins)
          "tail": 1.5,                       # ambience alone after the last line
          "min_duration": 0,                 # a scene with no lines needs one
          "lines": [
            {"speaker": "Keeper",            # required
             "text": "Another night like this one.",   # required
             "voice": "en-gb+m3",            # wins over the speaker's voice
             "pan": -0.5, "gain_db": 0, "pause_after": 0.8,
             "options": {"pitch": 40}}       # merged over the speaker's options
          ],
          "effects": [
            {"prompt": "a heavy door slams",   # required
             "at": 0.2,                      # seconds after the anchor (may be negative
                                             # with a line; never before the scene)
             "line": 0,                      # anchor: this line of the scene ...
             "anchor": "end",                # ... its "start" (default) or "end";
                                             # without `line`: the scene's start
             "duration": 2.0, "seed": 3, "gain_db": -3}
          ]
        }
      ]
    }

`load_script` raises ScriptError listing every problem, each named by its
place: `scenes[1].lines[3].speaker: 'Bob' is not one of the speakers (Keeper,
Mara)`. Unknown keys are errors too (a typo would otherwise be ignored).

Runs on Python 3.7 with the standard library.
"""

import difflib
import json
import math

__all__ = ["Script", "Scene", "Line", "Effect", "Ambience", "Speaker", "ScriptError",
           "load_script", "parse_script"]

DEFAULT_LEAD_IN_S = 1.0
DEFAULT_GAP_S = 0.5
DEFAULT_TAIL_S = 1.5


class ScriptError(ValueError):
    """A script that cannot be performed; `problems` lists each one with its place."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        where = "{}: ".format(source) if source else ""
        super(ScriptError, self).__init__("{}the script has {} problem{}:\n  {}".format(
            where, len(self.problems), "" if len(self.problems) == 1 else "s",
            "\n  ".join(self.problems)))


class Speaker(object):
    def __init__(self, name, voice=None, pan=0.0, gain_db=0.0, options=None):
        self.name = name
        self.voice = voice
        self.pan = pan
        self.gain_db = gain_db
        self.options = dict(options or {})


class Line(object):
    """One line of dialogue; `scene` and `index` say where it is in the script."""

    def __init__(self, scene, index, speaker, text, voice, pan, gain_db, pause_after, options):
        self.scene = scene
        self.index = index
        self.speaker = speaker
        self.text = text
        self.voice = voice
        self.pan = pan
        self.gain_db = gain_db
        self.pause_after = pause_after
        self.options = options

    @property
    def where(self):
        return "scene {} line {}".format(self.scene, self.index)


class Ambience(object):
    def __init__(self, scene, prompt, duration=None, seed=None, gain_db=0.0):
        self.scene = scene
        self.prompt = prompt
        self.duration = duration
        self.seed = seed
        self.gain_db = gain_db

    @property
    def where(self):
        return "scene {} ambience".format(self.scene)


class Effect(object):
    def __init__(self, scene, index, prompt, at=0.0, line=None, anchor="start", duration=None,
                 seed=None, gain_db=0.0):
        self.scene = scene
        self.index = index
        self.prompt = prompt
        self.at = at
        self.line = line
        self.anchor = anchor
        self.duration = duration
        self.seed = seed
        self.gain_db = gain_db

    @property
    def where(self):
        return "scene {} effect {}".format(self.scene, self.index)


class Scene(object):
    def __init__(self, index, name, ambience, lead_in, gap, tail, min_duration, lines, effects):
        self.index = index
        self.name = name
        self.ambience = ambience
        self.lead_in = lead_in
        self.gap = gap
        self.tail = tail
        self.min_duration = min_duration
        self.lines = lines
        self.effects = effects


class Script(object):
    def __init__(self, title, speakers, scenes):
        self.title = title
        self.speakers = speakers
        self.scenes = scenes

    @property
    def lines(self):
        return [line for scene in self.scenes for line in scene.lines]


# --- checking ----------------------------------------------------------------------------

_TOP_KEYS = ("title", "speakers", "scenes")
_SPEAKER_KEYS = ("voice", "pan", "gain_db", "options")
_SCENE_KEYS = ("name", "ambience", "lead_in", "gap", "tail", "min_duration", "lines", "effects")
_AMBIENCE_KEYS = ("prompt", "duration", "seed", "gain_db")
_LINE_KEYS = ("speaker", "text", "voice", "pan", "gain_db", "pause_after", "options")
_EFFECT_KEYS = ("prompt", "at", "line", "anchor", "duration", "seed", "gain_db")


class _Checker(object):
    """Collects problems instead of stopping at the first, so one run shows them all."""

    def __init__(self):
        self.problems = []

    def problem(self, where, message):
        self.problems.append("{}: {}".format(where, message))

    def mapping(self, where, value):
        if not isinstance(value, dict):
            self.problem(where, "expected an object, got {}".format(_kind(value)))
            return None
        return value

    def keys(self, where, value, allowed):
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                self.problem("{}.{}".format(where, key), "unknown key; {}".format(
                    "did you mean {!r}?".format(close[0]) if close
                    else "expected one of: " + ", ".join(allowed)))

    def text(self, where, value, required=False, default=None):
        if value is None:
            if required:
                self.problem(where, "required: a non-empty string")
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(where, "expected a non-empty string, got {}".format(_shown(value)))
            return default
        return value.strip()

    def number(self, where, value, default, low=None, high=None):
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            self.problem(where, "expected a number, got {}".format(_shown(value)))
            return default
        if (low is not None and value < low) or (high is not None and value > high):
            self.problem(where, "must be {}, got {!r}".format(_span(low, high), value))
            return default
        return float(value)

    def integer(self, where, value, low=0):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(where, "expected an integer, got {}".format(_shown(value)))
            return None
        if value < low:
            self.problem(where, "must be at least {}, got {}".format(low, value))
            return None
        return value

    def options(self, where, value):
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(where, "expected an object of extra TTS arguments, got {}".format(
                _kind(value)))
            return {}
        for reserved in ("text", "voice"):
            if reserved in value:
                self.problem("{}.{}".format(where, reserved), "set by the line itself; use "
                             "the line's `text` or `voice`")
        return dict(value)


def _kind(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number" if isinstance(value, (int, float))
                                     else type(value).__name__)


def _shown(value):
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _span(low, high):
    if low is not None and high is not None:
        return "from {:g} to {:g}".format(low, high)
    if low is not None:
        return "at least {:g}".format(low)
    return "at most {:g}".format(high)


def _speakers(check, value):
    speakers = {}
    if value is None:
        return speakers
    if check.mapping("speakers", value) is None:
        return speakers
    for name, spec in value.items():
        where = "speakers.{}".format(name)
        if check.mapping(where, spec) is None:
            continue
        check.keys(where, spec, _SPEAKER_KEYS)
        speakers[name] = Speaker(
            name, voice=check.text(where + ".voice", spec.get("voice")),
            pan=check.number(where + ".pan", spec.get("pan"), 0.0, -1.0, 1.0),
            gain_db=check.number(where + ".gain_db", spec.get("gain_db"), 0.0, -60.0, 24.0),
            options=check.options(where + ".options", spec.get("options")))
    return speakers


def _ambience(check, where, index, value):
    if value is None:
        return None
    if isinstance(value, str):
        value = {"prompt": value}
    if check.mapping(where, value) is None:
        return None
    check.keys(where, value, _AMBIENCE_KEYS)
    prompt = check.text(where + ".prompt", value.get("prompt"), required=True)
    ambience = Ambience(
        index, prompt,
        duration=check.number(where + ".duration", value.get("duration"), None, 0.1),
        seed=check.integer(where + ".seed", value.get("seed")),
        gain_db=check.number(where + ".gain_db", value.get("gain_db"), 0.0, -60.0, 24.0))
    return ambience if prompt else None


def _line(check, where, scene, index, value, speakers):
    if check.mapping(where, value) is None:
        return None
    check.keys(where, value, _LINE_KEYS)
    speaker_name = check.text(where + ".speaker", value.get("speaker"), required=True)
    text = check.text(where + ".text", value.get("text"), required=True)
    speaker = speakers.get(speaker_name)
    if speaker_name is not None and speakers and speaker is None:
        check.problem(where + ".speaker", "{!r} is not one of the speakers ({})".format(
            speaker_name, ", ".join(sorted(speakers))))
    if speaker is None:
        speaker = Speaker(speaker_name)
    options = dict(speaker.options)
    options.update(check.options(where + ".options", value.get("options")))
    line = Line(
        scene, index, speaker_name, text,
        voice=check.text(where + ".voice", value.get("voice"), default=speaker.voice)
        or speaker.voice,
        pan=check.number(where + ".pan", value.get("pan"), speaker.pan, -1.0, 1.0),
        gain_db=check.number(where + ".gain_db", value.get("gain_db"), speaker.gain_db,
                             -60.0, 24.0),
        pause_after=check.number(where + ".pause_after", value.get("pause_after"), None, 0.0),
        options=options)
    return line if speaker_name and text else None


def _effect(check, where, scene, index, value, n_lines):
    if check.mapping(where, value) is None:
        return None
    check.keys(where, value, _EFFECT_KEYS)
    prompt = check.text(where + ".prompt", value.get("prompt"), required=True)
    line = check.integer(where + ".line", value.get("line"))
    if line is not None and line >= n_lines:
        check.problem(where + ".line", "scene {} has {} line{} (0 to {}), there is no line "
                      "{}".format(scene, n_lines, "" if n_lines == 1 else "s",
                                  max(0, n_lines - 1), line)
                      if n_lines else "scene {} has no lines to anchor to".format(scene))
        line = None
    anchor = value.get("anchor", "start")
    if anchor not in ("start", "end"):
        check.problem(where + ".anchor", "expected \"start\" or \"end\", got {}".format(
            _shown(anchor)))
        anchor = "start"
    elif "anchor" in value and value.get("line") is None:
        check.problem(where + ".anchor", "needs a `line` to anchor to")
    at = check.number(where + ".at", value.get("at"), 0.0)
    if value.get("line") is None and at < 0:
        check.problem(where + ".at", "must be at least 0 from the scene's start, got "
                      "{!r}".format(at))
    effect = Effect(scene, index, prompt, at=at, line=line, anchor=anchor,
                    duration=check.number(where + ".duration", value.get("duration"), None,
                                          0.1),
                    seed=check.integer(where + ".seed", value.get("seed")),
                    gain_db=check.number(where + ".gain_db", value.get("gain_db"), 0.0, -60.0,
                                         24.0))
    return effect if prompt else None


def _list(check, where, value):
    if value is None:
        return []
    if not isinstance(value, list):
        check.problem(where, "expected a list, got {}".format(_kind(value)))
        return []
    return value


def parse_script(document, source=None):
    """A Script from the decoded JSON document; ScriptError names every problem."""
    check = _Checker()
    if check.mapping("(top level)", document) is None:
        raise ScriptError(check.problems, source)
    check.keys("(top level)", document, _TOP_KEYS)
    title = check.text("title", document.get("title"))
    speakers = _speakers(check, document.get("speakers"))
    scenes = []
    raw_scenes = _list(check, "scenes", document.get("scenes"))
    if not raw_scenes and "scenes" not in document:
        check.problem("scenes", "required: a list of at least one scene")
    elif not raw_scenes and isinstance(document.get("scenes"), list):
        check.problem("scenes", "the list is empty; add at least one scene")
    for i, raw in enumerate(raw_scenes):
        where = "scenes[{}]".format(i)
        if check.mapping(where, raw) is None:
            continue
        check.keys(where, raw, _SCENE_KEYS)
        raw_lines = _list(check, where + ".lines", raw.get("lines"))
        lines = [_line(check, "{}.lines[{}]".format(where, j), i, j, value, speakers)
                 for j, value in enumerate(raw_lines)]
        effects = [_effect(check, "{}.effects[{}]".format(where, j), i, j, value,
                           len(raw_lines))
                   for j, value in enumerate(_list(check, where + ".effects",
                                                   raw.get("effects")))]
        min_duration = check.number(where + ".min_duration", raw.get("min_duration"), 0.0, 0.0)
        if not raw_lines and not min_duration and not any(
                e is not None and e.line is None for e in effects):
            check.problem(where, "a scene without lines needs `min_duration` (seconds)")
        scenes.append(Scene(
            i, check.text(where + ".name", raw.get("name"), default="scene {}".format(i)),
            _ambience(check, where + ".ambience", i, raw.get("ambience")),
            lead_in=check.number(where + ".lead_in", raw.get("lead_in"), DEFAULT_LEAD_IN_S, 0.0),
            gap=check.number(where + ".gap", raw.get("gap"), DEFAULT_GAP_S, 0.0),
            tail=check.number(where + ".tail", raw.get("tail"), DEFAULT_TAIL_S, 0.0),
            min_duration=min_duration,
            lines=[line for line in lines if line is not None],
            effects=[effect for effect in effects if effect is not None]))
    if check.problems:
        raise ScriptError(check.problems, source)
    return Script(title, speakers, scenes)


def load_script(path_or_document):
    """A Script from a path to a JSON file, a JSON string, or an already decoded dict."""
    if isinstance(path_or_document, dict):
        return parse_script(path_or_document)
    text = str(path_or_document)
    if text.lstrip().startswith("{"):
        source, raw = None, text
    else:
        source = text
        with open(text, encoding="utf-8") as handle:
            raw = handle.read()
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ScriptError(["not valid JSON: {}".format(exc)], source)
    return parse_script(document, source)
