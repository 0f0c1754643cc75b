"""Whisper through faster-whisper (CTranslate2), from local weights only.

`model_dir` names a CTranslate2 conversion of a Whisper model (a download of
Systran/faster-whisper-small, large-v3, ... or the output of
`ct2-transformers-converter`). The engine never downloads anything: the
path goes to WhisperModel as a directory (faster-whisper downloads only for
a model *name*), with local_files_only=True, and HF_HUB_OFFLINE=1 is set in
the daemon before faster-whisper is imported. faster-whisper would still
fetch a tokenizer from the Hub when tokenizer.json is absent, so preflight()
requires it.

Whisper decodes 30 s windows with the whole signal at hand: `transcribe`
and `transcribe_stream` run faster-whisper once over the audio, the latter
yielding the text so far after each decoded segment (chunk_s is not used).
A streaming session keeps its audio and decodes it all again for a partial
when at least `partial_every_s` of new audio came in since the last one,
and once more at stream_end: simple and correct, but its cost grows with
the session's length; keep sessions to utterances (max_audio_s bounds them).

preflight() imports neither faster-whisper nor ctranslate2. Runs on Python
3.9+ (faster-whisper's floor); the modelhost code it imports runs on 3.7.
"""

import importlib.util
import os
import re
import sys

import numpy

from . import audio
from .base import (PROGRESS_STEP, AsrEngine, check_bool, check_int, check_number, check_path,
                   session_option_problems, unknown_option_problems)

NAME = "faster-whisper"
README = "daemons/asr/README.md"
REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "requirements-whisper.txt")
DEVICES = ("cpu", "cuda", "auto")
OPTIONS = ("model_dir", "device", "device_index", "compute_type", "cpu_threads", "beam_size",
           "language", "word_timestamps", "vad_filter", "partial_every_s", "max_sessions",
           "session_idle_s", "max_audio_s")
WHAT_MODEL_DIR_HOLDS = ("a CTranslate2 Whisper model directory (model.bin, config.json, "
                        "tokenizer.json, vocabulary.json or vocabulary.txt), e.g. "
                        "`huggingface-cli download Systran/faster-whisper-small --local-dir DIR`;"
                        " see " + README)


def _option_problems(options):
    problems = unknown_option_problems(options, OPTIONS, NAME)
    model_dir = options.get("model_dir")
    if model_dir is None:
        problems.append("{}: option 'model_dir' is not set: it must name {}".format(
            NAME, WHAT_MODEL_DIR_HOLDS))
    check_path(options, "model_dir", problems, NAME)
    device = options.get("device")
    if device is not None and device not in DEVICES:
        problems.append("{}: option 'device' must be one of {}, not {!r}".format(
            NAME, ", ".join(DEVICES), device))
    compute_type = options.get("compute_type")
    if compute_type is not None and (not isinstance(compute_type, str)
                                     or not re.match(r"^[a-z0-9_]+$", compute_type)):
        problems.append("{}: option 'compute_type' must be a CTranslate2 compute type such as "
                        "'default', 'int8', 'float16' or 'int8_float16', not {!r}".format(
                            NAME, compute_type))
    language = options.get("language")
    if language is not None and (not isinstance(language, str)
                                 or not re.match(r"^[a-z]{2,3}$", language)):
        problems.append("{}: option 'language' must be a Whisper language code such as 'en' "
                        "(or left out, to detect it), not {!r}".format(NAME, language))
    check_int(options, "device_index", 0, 64, problems, NAME)
    check_int(options, "cpu_threads", 0, 1024, problems, NAME)
    check_int(options, "beam_size", 1, 32, problems, NAME)
    check_bool(options, "word_timestamps", problems, NAME)
    check_bool(options, "vad_filter", problems, NAME)
    check_number(options, "partial_every_s", 0, 3600, problems, NAME)
    return problems + session_option_problems(options, NAME)


def _lfs_pointer(path):
    """Whether a small file is a Git LFS pointer (a clone without `git lfs pull`)."""
    try:
        if os.path.getsize(path) > 1024:
            return False
        with open(path, "rb") as handle:
            return handle.read(64).startswith(b"version https://git-lfs")
    except OSError:
        return False


def model_dir_problems(model_dir):
    """What the directory lacks for faster-whisper to load it without a download."""
    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        return ["{}: model_dir {} not found: expected {}".format(
            NAME, model_dir, WHAT_MODEL_DIR_HOLDS)]
    problems = []
    for name, why in (("model.bin", "the CTranslate2 weights"),
                      ("config.json", "the model's configuration"),
                      ("tokenizer.json", "the tokenizer (without it faster-whisper fetches one "
                                         "from the Hugging Face Hub, which this daemon never "
                                         "does)")):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            problems.append("{}: {} not found: {} belongs there; {} is not a complete {}".format(
                NAME, path, why, model_dir, WHAT_MODEL_DIR_HOLDS))
        elif _lfs_pointer(path):
            problems.append("{}: {} is a Git LFS pointer, not {}: run `git lfs pull` in {}"
                            .format(NAME, path, why, model_dir))
    if not any(os.path.isfile(os.path.join(model_dir, name))
               for name in ("vocabulary.json", "vocabulary.txt")):
        problems.append("{}: neither vocabulary.json nor vocabulary.txt is in {}: CTranslate2 "
                        "needs the model's vocabulary".format(NAME, model_dir))
    return problems


class FasterWhisperEngine(AsrEngine):
    """Speech to text with a local faster-whisper model; see README.md."""

    NAME = NAME

    def __init__(self, model_dir=None, device="cpu", device_index=0, compute_type="default",
                 cpu_threads=0, beam_size=5, language=None, word_timestamps=True,
                 vad_filter=False, partial_every_s=1.0, **options):
        mine = dict(model_dir=model_dir, device=device, device_index=device_index,
                    compute_type=compute_type, cpu_threads=cpu_threads, beam_size=beam_size,
                    language=language, word_timestamps=word_timestamps, vad_filter=vad_filter,
                    partial_every_s=partial_every_s)
        given = dict(options, **{k: v for k, v in mine.items() if v is not None})
        problems = _option_problems(given)
        if problems:
            raise ValueError("; ".join(problems))
        super(FasterWhisperEngine, self).__init__(**options)
        self.options.update(mine)
        self.model_dir = os.path.abspath(model_dir)
        self.device = device
        self.device_index = device_index
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.beam_size = beam_size
        self.language = language  # None: detected per call
        self.word_timestamps = word_timestamps
        self.vad_filter = vad_filter
        self.partial_every_s = float(partial_every_s)
        self.model = None
        self.version = None

    @classmethod
    def preflight(cls, options):
        problems = _option_problems(options)
        if problems:
            return problems
        for module in ("faster_whisper", "ctranslate2"):
            if importlib.util.find_spec(module) is None:
                problems.append("{}: {} is not installed in {} ({}); install it with `pip "
                                "install -r {}`".format(NAME, module, sys.prefix, sys.executable,
                                                        REQUIREMENTS))
        return problems + model_dir_problems(options["model_dir"])

    # --- lifecycle -------------------------------------------------------------------

    def _load(self):
        problems = model_dir_problems(self.model_dir)
        if problems:
            raise RuntimeError("faster-whisper: cannot load: " + "; ".join(problems))
        # Before faster-whisper (and huggingface_hub) are imported: nothing of theirs
        # may reach for the network, whatever the code path.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        self.model = self._build_model()
        try:
            from importlib import metadata
            self.version = metadata.version("faster-whisper")
        except Exception:  # a version is only for ps
            self.version = None
        languages = {code.lower(): code for code in self.model.supported_languages}
        if self.language is not None and self.language not in languages:
            self.model = None
            raise RuntimeError("faster-whisper: option language {!r} is not one this model "
                               "speaks; valid: {}".format(self.language,
                                                          ", ".join(sorted(languages))))
        languages[None] = self.language
        return languages

    def _build_model(self):
        """The faster-whisper WhisperModel of model_dir: the one place that calls upstream's
        constructor (tests put a stand-in here)."""
        from faster_whisper import WhisperModel

        return WhisperModel(self.model_dir, device=self.device, device_index=self.device_index,
                            compute_type=self.compute_type, cpu_threads=self.cpu_threads,
                            local_files_only=True)

    def _unload(self):
        self.model = None

    def _describe(self):
        return {"engine": "faster-whisper", "version": self.version, "model": self.model_dir,
                "device": self.device, "compute_type": self.compute_type}

    # --- decoding ----------------------------------------------------------------------

    def _run(self, samples, language):
        """(segments generator, info) of faster-whisper over 16 kHz float32 samples."""
        model = self.model
        if model is None:
            raise RuntimeError("faster-whisper: the engine is not loaded")
        return model.transcribe(numpy.ascontiguousarray(samples, dtype=numpy.float32),
                                language=language, beam_size=self.beam_size,
                                word_timestamps=self.word_timestamps,
                                vad_filter=self.vad_filter)

    def _decode(self, ctx, samples, language, chunk_s, live):
        """Whisper wants the whole signal: one faster-whisper run, a partial per segment."""
        duration = len(samples) / float(audio.TARGET_RATE)
        ctx.progress(0.0, "transcribe", "transcribing {:.1f} s of audio".format(duration))
        ctx.check_cancelled()
        segments, info = self._run(samples, language)
        done, reported = [], 0.0
        for segment in segments:  # a lazy generator: the decoding happens here
            done.append(segment)
            ctx.check_cancelled()
            fraction = min(1.0, float(segment.end) / duration) if duration > 0 else 0.0
            if fraction - reported >= PROGRESS_STEP and fraction < 1.0:
                reported = fraction
                ctx.progress(fraction, "transcribe")
            if live:
                yield _text_of(done)
        ctx.progress(1.0, "transcribe", "done")
        return _result_of(done, info, duration)

    def _recognizer(self, language, live):
        return _SessionRecognizer(self, language)


def _text_of(segments):
    return "".join(segment.text for segment in segments).strip()


def _result_of(segments, info, duration):
    """transcribe's map; times clamped to the audio (Whisper may place a last timestamp
    past its end)."""
    def seconds(value):
        return round(min(max(float(value), 0.0), duration), 3)

    words = []
    for segment in segments:
        for word in segment.words or ():
            words.append({"start": seconds(word.start), "end": seconds(word.end),
                          "word": word.word.strip()})
    return {"text": _text_of(segments), "language": getattr(info, "language", None),
            "segments": [{"start": seconds(s.start), "end": seconds(s.end),
                          "text": s.text.strip()} for s in segments],
            "words": words}


class _SessionRecognizer(object):
    """A streaming session's audio, decoded whole for each partial and at the end."""

    def __init__(self, engine, language):
        self._engine = engine
        self._language = language
        self._chunks = []
        self._samples = 0
        self._decoded_at = 0  # samples the last partial covered
        self._partial = ""

    def feed(self, ctx, samples):
        if len(samples):
            self._chunks.append(numpy.asarray(samples, dtype=numpy.float32))
            self._samples += len(samples)

    def _audio(self):
        if len(self._chunks) > 1:
            self._chunks = [numpy.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else numpy.zeros(0, numpy.float32)

    def partial(self, ctx):
        every = int(self._engine.partial_every_s * audio.TARGET_RATE)
        if self._samples and self._samples - self._decoded_at >= every:
            segments, _ = self._engine._run(self._audio(), self._language)
            self._partial = _text_of(list(segments))
            self._decoded_at = self._samples
        return self._partial

    def finish(self, ctx):
        if not self._samples:
            return {"text": "", "language": self._language, "segments": [], "words": []}
        segments, info = self._engine._run(self._audio(), self._language)
        return _result_of(list(segments), info, self._samples / float(audio.TARGET_RATE))

    def close(self):
        self._chunks = []
