"""CMU PocketSphinx: the offline speech recognizer of the embedded default.

The `pocketsphinx` wheel (5.0.4) ships the decoder and a US English model
(acoustic model, a 3-gram language model, the CMU dictionary), so a fresh
machine recognizes speech with no download and no GPU. It is no match for
Whisper on real recordings: it is there so that speech in and speech out
work out of the box (see README.md).

How audio is decoded: 30 ms frames go through pocketsphinx's voice activity
detector; speech opens an *utterance* (with the 0.3 s of audio before it, so
that a soft first consonant is not cut off), and half a second of non-speech
ends it. Where partial results are wanted (transcribe_stream, sessions) the
decoder follows the utterance frame by frame, and its hypothesis is the
partial. When the utterance ends, a final pass decodes it whole, with the
cepstral mean of the whole utterance (full_utt): better than the live pass,
whose mean adapts as it goes. Each pass starts with a fresh front end
(reinit_feat), so a result never depends on what a pooled decoder heard
before. Long audio is many utterances, so memory stays bounded, and each
utterance is a segment of the result. The final text does not depend on how
the audio was cut into chunks: transcribe, transcribe_stream and a streaming
session give the same result for the same audio.

The decoder is driven through ctypes, on the C API that the wheel's
extension module exports (ps_init, ps_process_raw, ps_end_utt, ...), not
through its Cython classes: those hold the GIL for the whole of a call, and
the final pass over an utterance, or ps_end_utt's second search, takes
seconds of CPU, during which the runtime's heartbeats would stop (the broker
takes a daemon silent for heartbeat_s x liveness for dead) and a second
slot could not run. ctypes releases the GIL around each C call. Only the
voice activity detector (microseconds a frame) goes through the Cython class.

A decoder holds the whole model (about 85 MB) and one utterance at a time,
so each running call and each open session has its own, from a small pool:
load() makes the first one, more are made when needed (about 0.4 s each)
and at most IDLE_DECODERS are kept when idle.

Runs on Python 3.8 and 3.10 .. 3.13 (the wheels of pocketsphinx 5.0.4) with
numpy; the modelhost code it imports also runs on 3.7.
"""

import collections
import ctypes
import importlib.util
import json
import os
import re
import sys
import threading

from . import audio
from .base import (AsrEngine, check_int, check_path, session_option_problems,
                   unknown_option_problems)

NAME = "pocketsphinx"
README = "daemons/asr/README.md"
REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "requirements-pocketsphinx.txt")
FRAME_S = 0.03  # the voice activity detector's frame
PAD_FRAMES = 10  # audio kept before speech starts (0.3 s)
PAUSE_FRAMES = 17  # non-speech that ends an utterance (~0.5 s)
# Bounds of an utterance, and so of one C call (cancellation waits for it):
LONG_UTTERANCE_FRAMES = 667  # past 20 s, an utterance ends at the next non-speech frame
MAX_UTTERANCE_FRAMES = 1000  # and at 30 s in any case
IDLE_DECODERS = 2
# The files of an acoustic model directory that pocketsphinx cannot do without.
HMM_FILES = ("mdef", "means", "variances", "transition_matrices")
OPTIONS = ("hmm", "lm", "dictionary", "language", "vad_mode", "max_sessions", "session_idle_s",
           "max_audio_s")
# Words of the result that are no words: silence, sentence marks, noise classes.
_FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")
_ALTERNATE = re.compile(r"\(\d+\)$")  # "two(2)": the second pronunciation of "two"


def _bundled_model():
    """The en-us model directory inside the installed pocketsphinx wheel, or None."""
    spec = importlib.util.find_spec("pocketsphinx")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "model", "en-us")


def _option_problems(options):
    problems = unknown_option_problems(options, OPTIONS, NAME)
    for name in ("hmm", "lm", "dictionary"):
        check_path(options, name, problems, NAME)
    language = options.get("language")
    if language is not None and (not isinstance(language, str)
                                 or not re.match(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$",
                                                 language)):
        problems.append("{}: option 'language' must be a language code such as 'en', not "
                        "{!r}".format(NAME, language))
    check_int(options, "vad_mode", 0, 3, problems, NAME)
    return problems + session_option_problems(options, NAME)


class PocketsphinxEngine(AsrEngine):
    """Speech to text with pocketsphinx; see README.md for the operations."""

    NAME = NAME

    def __init__(self, hmm=None, lm=None, dictionary=None, language="en", vad_mode=0,
                 **options):
        given = dict(options, hmm=hmm, lm=lm, dictionary=dictionary, language=language,
                     vad_mode=vad_mode)
        problems = _option_problems({k: v for k, v in given.items() if v is not None})
        if problems:
            raise ValueError("; ".join(problems))
        super(PocketsphinxEngine, self).__init__(**options)
        self.options.update(hmm=hmm, lm=lm, dictionary=dictionary, language=language,
                            vad_mode=vad_mode)
        # Paths replacing the wheel's model (None: the wheel's en-us files).
        self.hmm, self.lm, self.dictionary = hmm, lm, dictionary
        self.language = language.lower().replace("_", "-")
        self.vad_mode = vad_mode
        self.version = None
        self.model = None
        self._config = None
        self._pool = []  # idle Decoders
        self._pool_lock = threading.Lock()
        self._generation = 0  # bumped by unload: decoders of an older load are dropped

    @classmethod
    def preflight(cls, options):
        problems = _option_problems(options)
        if problems:
            return problems
        if importlib.util.find_spec("pocketsphinx") is None:
            return ["pocketsphinx is not installed in {} ({}); install it with `pip install -r "
                    "{}`".format(sys.prefix, sys.executable, REQUIREMENTS)]
        return _model_problems(options)

    # --- lifecycle -------------------------------------------------------------------

    def _load(self):
        problems = _model_problems(self.options)
        if problems:
            raise RuntimeError("pocketsphinx: cannot load: " + "; ".join(problems))
        try:
            from importlib import metadata
            self.version = metadata.version("pocketsphinx")
        except Exception:  # importlib.metadata is 3.8+; a version is only for ps
            self.version = None
        model = _bundled_model()
        # The wheel's model where no path is given, as pocketsphinx's own Config does.
        config = {"hmm": os.path.join(model, "en-us"), "lm": os.path.join(model, "en-us.lm.bin"),
                  "dict": os.path.join(model, "cmudict-en-us.dict"),
                  "samprate": audio.TARGET_RATE, "loglevel": "ERROR"}
        for key, path in (("hmm", self.hmm), ("lm", self.lm), ("dict", self.dictionary)):
            if path is not None:
                config[key] = os.path.abspath(path)
        decoder = _Decoder(config)
        self._config = config
        self.model = config["hmm"]
        with self._pool_lock:
            self._pool = [decoder]
        primary = self.language.split("-", 1)[0]
        return {None: self.language, self.language: self.language, primary: self.language}

    def _unload(self):
        with self._pool_lock:
            idle, self._pool = self._pool, []
            self._generation += 1
            self._config = None
        for decoder in idle:
            decoder.close()

    def _describe(self):
        with self._pool_lock:
            idle = len(self._pool)
        return {"engine": "pocketsphinx", "version": self.version, "model": self.model,
                "language": self.language, "idle_decoders": idle}

    # --- decoders ----------------------------------------------------------------------

    def _acquire(self):
        """(decoder, generation): an idle decoder, or a new one."""
        with self._pool_lock:
            if self._config is None:
                raise RuntimeError("pocketsphinx: the engine is not loaded")
            generation = self._generation
            if self._pool:
                return self._pool.pop(), generation
            config = dict(self._config)
        return _Decoder(config), generation

    def _release(self, decoder, generation):
        with self._pool_lock:
            if generation == self._generation and len(self._pool) < IDLE_DECODERS:
                self._pool.append(decoder)
                return
        decoder.close()

    def _recognizer(self, language, live):
        import pocketsphinx

        vad = pocketsphinx.Vad(mode=self.vad_mode, sample_rate=audio.TARGET_RATE,
                               frame_length=FRAME_S)
        decoder, generation = self._acquire()
        return _Recognizer(self, decoder, generation, language, vad, live)


_LIBRARY_LOCK = threading.Lock()
_library = None


def _c_library():
    """The wheel's extension module as a C library, its functions declared (once)."""
    global _library
    with _LIBRARY_LOCK:
        if _library is not None:
            return _library
        import pocketsphinx  # noqa: F401 (loads the extension module)

        lib = ctypes.CDLL(sys.modules["pocketsphinx._pocketsphinx"].__file__)
        p, s, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for name, result, arguments in (
                ("ps_config_parse_json", p, [p, s]),
                ("ps_config_free", i, [p]),
                ("ps_config_int", ctypes.c_long, [p, s]),
                ("ps_init", p, [p]),
                ("ps_free", i, [p]),
                ("ps_get_config", p, [p]),
                ("ps_reinit_feat", i, [p, p]),
                ("ps_start_utt", i, [p]),
                ("ps_process_raw", i, [p, s, ctypes.c_size_t, i, i]),
                ("ps_end_utt", i, [p]),
                ("ps_get_hyp", s, [p, ctypes.POINTER(ctypes.c_int32)]),
                ("ps_seg_iter", p, [p]),
                ("ps_seg_next", p, [p]),
                ("ps_seg_word", s, [p]),
                ("ps_seg_frames", None, [p, ctypes.POINTER(i), ctypes.POINTER(i)]),
                ("ps_seg_free", None, [p])):
            function = getattr(lib, name)
            function.restype, function.argtypes = result, arguments
        _library = lib
        return lib


class _Decoder(object):
    """A ps_decoder_t through ctypes: the calls release the GIL (see the module doc)."""

    def __init__(self, config):
        self._lib = lib = _c_library()
        parsed = lib.ps_config_parse_json(None, json.dumps(config).encode("utf-8"))
        if not parsed:
            raise RuntimeError("pocketsphinx: the configuration {} was refused".format(config))
        try:
            self._ps = lib.ps_init(parsed)  # retains the configuration
        finally:
            lib.ps_config_free(parsed)
        if not self._ps:
            raise RuntimeError("pocketsphinx: ps_init failed for the model {} (its log has "
                               "the reason; is the model complete?)".format(config["hmm"]))
        self.frame_rate = int(lib.ps_config_int(lib.ps_get_config(self._ps), b"frate"))

    def _check(self, status, what):
        if status < 0:
            raise RuntimeError("pocketsphinx: {} failed".format(what))

    def reinit_feat(self):
        self._check(self._lib.ps_reinit_feat(self._ps, None), "ps_reinit_feat")

    def start_utt(self):
        self._check(self._lib.ps_start_utt(self._ps), "ps_start_utt")

    def process_raw(self, pcm, full_utt=False):
        self._check(self._lib.ps_process_raw(self._ps, pcm, len(pcm) // 2, 0, int(full_utt)),
                    "ps_process_raw")

    def end_utt(self):
        self._check(self._lib.ps_end_utt(self._ps), "ps_end_utt")

    def hyp(self):
        """The best hypothesis so far, "" when there is none."""
        text = self._lib.ps_get_hyp(self._ps, None)
        return text.decode("utf-8", "replace").strip() if text else ""

    def seg(self):
        """[(word, first frame, last frame)] of the best hypothesis (frames inclusive)."""
        lib, found = self._lib, []
        first, last = ctypes.c_int(), ctypes.c_int()
        iterator = lib.ps_seg_iter(self._ps)
        while iterator:
            lib.ps_seg_frames(iterator, ctypes.byref(first), ctypes.byref(last))
            found.append(((lib.ps_seg_word(iterator) or b"").decode("utf-8", "replace"),
                          first.value, last.value))
            iterator = lib.ps_seg_next(iterator)  # frees the iterator at the end
        return found

    def close(self):
        ps, self._ps = self._ps, None
        if ps:
            self._lib.ps_free(ps)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the library may be gone
            pass


def _model_problems(options):
    """Paths of the model that are missing, as lines for people."""
    problems = []
    bundled = _bundled_model()
    hmm = options.get("hmm")
    if hmm is not None:
        hmm = os.path.abspath(hmm)
        if not os.path.isdir(hmm):
            problems.append("pocketsphinx: acoustic model directory (option hmm) not found at "
                            "{}: expected a directory with {}".format(hmm, ", ".join(HMM_FILES)))
        else:
            missing = [name for name in HMM_FILES if not os.path.isfile(os.path.join(hmm, name))]
            if missing:
                problems.append("pocketsphinx: {} is not an acoustic model directory: {} "
                                "missing".format(hmm, ", ".join(missing)))
    for name, what in (("lm", "language model (a .lm.bin or ARPA file)"),
                       ("dictionary", "pronunciation dictionary (.dict)")):
        path = options.get(name)
        if path is not None and not os.path.isfile(os.path.abspath(path)):
            problems.append("pocketsphinx: {} (option {}) not found at {}".format(
                what, name, os.path.abspath(path)))
    if bundled is not None and None in (options.get("hmm"), options.get("lm"),
                                        options.get("dictionary")):
        for path in (os.path.join(bundled, "en-us"), os.path.join(bundled, "en-us.lm.bin"),
                     os.path.join(bundled, "cmudict-en-us.dict")):
            if not os.path.exists(path):
                problems.append("pocketsphinx: the wheel's model file {} is missing; reinstall "
                                "it with `pip install --force-reinstall -r {}`".format(
                                    path, REQUIREMENTS))
    return problems


class _Recognizer(object):
    """One stream of audio through a decoder: utterances cut at pauses (see the module doc)."""

    def __init__(self, engine, decoder, generation, language, vad, live):
        self._engine = engine
        self._decoder = decoder
        self._generation = generation
        self._language = language
        self._vad = vad
        # live: follow each utterance frame by frame for partial hypotheses; else only
        # the final pass runs (transcribe, which shows no partials).
        self._live = live
        self._frame_bytes = vad.frame_bytes
        self._frame_s = vad.frame_length
        self._pending = bytearray()  # 16-bit PCM short of a whole frame
        self._before = collections.deque(maxlen=PAD_FRAMES)  # frames before speech
        self._frames = 0  # frames seen since the start
        self._utterance = None  # the current utterance's PCM, None between utterances
        self._utterance_start = 0.0  # seconds, where the current utterance's audio starts
        self._utterance_frames = 0
        self._silent_frames = 0
        self._segments = []
        self._words = []
        self._closed = False

    def feed(self, ctx, samples):
        self._pending += audio.to_int16_bytes(samples)
        size = self._frame_bytes
        whole = len(self._pending) - len(self._pending) % size
        for start in range(0, whole, size):
            self._frame(bytes(self._pending[start:start + size]))
        del self._pending[:whole]

    def _frame(self, frame):
        speech = self._vad.is_speech(frame)
        self._frames += 1
        if self._utterance is None:
            self._before.append(frame)
            if speech:
                self._utterance = bytearray(b"".join(self._before))
                self._utterance_start = (self._frames - len(self._before)) * self._frame_s
                self._utterance_frames = len(self._before)
                self._silent_frames = 0
                self._before.clear()
                if self._live:
                    # A fresh front end (cepstral mean, noise estimate) for each pass:
                    # what a pooled decoder heard before must not change the result.
                    self._decoder.reinit_feat()
                    self._decoder.start_utt()
                    self._decoder.process_raw(bytes(self._utterance))
            return
        self._utterance += frame
        if self._live:
            self._decoder.process_raw(frame)
        self._utterance_frames += 1
        self._silent_frames = 0 if speech else self._silent_frames + 1
        if (self._silent_frames >= PAUSE_FRAMES
                or (self._utterance_frames >= LONG_UTTERANCE_FRAMES and not speech)
                or self._utterance_frames >= MAX_UTTERANCE_FRAMES):
            self._end_utterance()

    def _end_utterance(self):
        """The final pass over the utterance: its cepstral mean from the whole of it
        (full_utt), which decodes better than the live pass and the same every time."""
        decoder, utterance = self._decoder, bytes(self._utterance)
        self._utterance = None
        if self._live:
            decoder.end_utt()
        decoder.reinit_feat()
        decoder.start_utt()
        decoder.process_raw(utterance, full_utt=True)
        decoder.end_utt()
        text = decoder.hyp()
        frame_rate = float(decoder.frame_rate)
        words = []
        for word, first, last in decoder.seg():
            word = _ALTERNATE.sub("", word)
            if _FILLER.match(word):
                continue
            words.append({"start": round(self._utterance_start + first / frame_rate, 3),
                          "end": round(self._utterance_start + (last + 1) / frame_rate, 3),
                          "word": word})
        if text:
            start = words[0]["start"] if words else round(self._utterance_start, 3)
            end = words[-1]["end"] if words else round(
                self._utterance_start + self._utterance_frames * self._frame_s, 3)
            self._segments.append({"start": start, "end": end, "text": text})
            self._words.extend(words)

    def partial(self, ctx):
        texts = [segment["text"] for segment in self._segments]
        if self._utterance is not None and self._live:
            hypothesis = self._decoder.hyp()
            if hypothesis:
                texts.append(hypothesis)
        return " ".join(texts)

    def finish(self, ctx):
        if self._pending:  # the last partial frame, padded with silence
            self._frame(bytes(self._pending) + b"\x00" * (self._frame_bytes - len(self._pending)))
            del self._pending[:]
        if self._utterance is not None:
            self._end_utterance()
        return {"text": " ".join(segment["text"] for segment in self._segments),
                "language": self._language, "segments": list(self._segments),
                "words": list(self._words)}

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._utterance is not None and self._live:
            try:
                self._decoder.end_utt()
            except Exception:  # a decoder in a bad state is not returned to the pool
                self._decoder.close()
                return
        self._utterance = None
        self._engine._release(self._decoder, self._generation)
