"""The users' programs, written only against the public client API.

- `modelhost.pipelines.drama`: an audio drama from a JSON script (dialogue by
  the TTS daemon, ambience and effects by the text-to-audio daemon, one mixed
  track with stems); `modelhost audio-drama` on the command line
  (`modelhost.pipelines.drama_cli`).
- `modelhost.pipelines.script`: the drama's script format and its checks.
- `modelhost.pipelines.mixing`: the mixing functions (loudness, ducking,
  fades, loops, a true-peak limiter) on numpy arrays.
- `modelhost.pipelines.chat`: the voice chat loop (speech recognition ->
  language model -> text-to-speech -> talking head, streamed end to end,
  interruptible); `modelhost chat` (`modelhost.pipelines.chat_cli`), with
  `sentences` (the streaming sentence splitter), `llm` (the OpenAI-compatible
  language model) and `chat_io` (sinks, playback, microphone, voice activity).

Needs the `pipelines` extra (numpy, soundfile, soxr, pyloudnorm). The names
below are imported when first used, so `import modelhost.pipelines` (and the
command line's parser) costs nothing until a pipeline runs.
"""

import importlib

_EXPORTS = {
    "DramaEvent": "drama", "DramaOptions": "drama", "DramaResult": "drama",
    "Failure": "drama", "render_drama": "drama",
    "Script": "script", "ScriptError": "script", "load_script": "script",
    "AsyncChat": "chat", "Chat": "chat", "ChatConfig": "chat", "TurnResult": "chat",
    "SentenceSplitter": "sentences",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError("module 'modelhost.pipelines' has no attribute {!r}".format(name))
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
