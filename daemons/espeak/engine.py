"""espeak-ng text-to-speech: the real, offline engine of the embedded default.

The engine drives libespeak-ng through ctypes; the library and its
`espeak-ng-data` directory come from the `espeakng-loader` wheel, so a fresh
machine serves speech with no system packages and no numpy. The library is
initialized once in load() and stays initialized between calls (a warm
daemon); every call only sets the voice, rate and pitch and synthesizes.

Runs on Python 3.7 .. 3.13 with the standard library, espeakng-loader and
modelhost (pyzmq + msgpack).

Notes on the C library (espeak-ng 1.52, as shipped by espeakng-loader 0.2.4):

- The data `path` may name the `espeak-ng-data` directory itself or its
  parent on 1.52 (it tries `path/espeak-ng-data`, then `path`); older
  releases only accept the parent. We try the data directory, then its parent.
- NULL is no option: the compiled-in default is the wheel builder's directory.
- espeak_Initialize hides failures: with a bad path it prints an error and
  calls exit(1), killing the daemon, unless the options carry
  espeakINITIALIZE_DONT_EXIT; with that flag it returns 0 on a first
  initialization, but the *previous* sample rate (22050) after an earlier
  success, and the next call segfaults on the half-loaded data. So load()
  initializes through the calls espeak_Initialize wraps (espeak_ng.h:
  espeak_ng_InitializePath, espeak_ng_Initialize -> a status,
  espeak_ng_InitializeOutput(SYNCHRONOUS), espeak_ng_GetSampleRate) and
  falls back to espeak_Initialize(..., DONT_EXIT) only where those are absent.
- The library is process-global (one set of voices, one callback), and not
  thread-safe: one loaded EspeakEngine per process, synthesis under a lock.
- espeak_SetVoiceByName takes a voice file (`gmw/en`) or a voice name, not a
  language code: "en-gb" is a language of gmw/en and has no file of its own,
  so it fails with EE_NOT_FOUND. Codes are resolved to their best voice here.
  A listed voice whose dictionary the data lacks (fo_dict in the wheel) sets
  fine but speaks silence: load() leaves such voices out.

Its length (about 730 lines): most of it is the ctypes binding of libespeak-ng and
the workarounds above, which belong beside the one engine that needs them.
"""

import ctypes
import difflib
import logging
import os
import queue
import sys
import threading
import weakref

from modelhost.daemons.engine import BadArguments, Cancelled, Engine, operation

log = logging.getLogger("modelhost.daemon.espeak")

# --- speak_lib.h -------------------------------------------------------------

AUDIO_OUTPUT_PLAYBACK = 0
AUDIO_OUTPUT_RETRIEVAL = 1
AUDIO_OUTPUT_SYNCHRONOUS = 2

EE_OK = 0
EE_INTERNAL_ERROR = -1
EE_BUFFER_FULL = 1
EE_NOT_FOUND = 2

espeakINITIALIZE_DONT_EXIT = 0x8000

# espeak_ng.h, for an initialization status that espeak_Initialize hides.
ENS_OK = 0
ENOUTPUT_MODE_SYNCHRONOUS = 0x0001

espeakCHARS_UTF8 = 1
POS_CHARACTER = 1

espeakRATE = 1
espeakVOLUME = 2
espeakPITCH = 3

espeakEVENT_LIST_TERMINATED = 0
espeakEVENT_WORD = 1
espeakEVENT_SENTENCE = 2
espeakEVENT_END = 5
espeakEVENT_MSG_TERMINATED = 6

_ERRORS = {EE_INTERNAL_ERROR: "EE_INTERNAL_ERROR", EE_BUFFER_FULL: "EE_BUFFER_FULL",
           EE_NOT_FOUND: "EE_NOT_FOUND"}


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p),
                ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters of the text
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        # (priority byte, NUL-terminated language)* then a 0 byte: read by address.
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.POINTER(_Event))

# --- limits --------------------------------------------------------------------

MAX_TEXT_CHARS = 10000
RATE_RANGE = (80, 450)  # words per minute
PITCH_RANGE = (0, 99)
BUFFER_MS = 60  # audio per callback
STREAM_CHUNK_S = 0.25  # audio per streamed chunk
_PROGRESS_STEP = 0.05

# The library is process-global: the engine that has it loaded, if any.
_OWNER_LOCK = threading.Lock()
_owner = None  # weakref to the loaded EspeakEngine


def _default_paths():
    """(library, data) from the espeakng-loader wheel; RuntimeError if it is absent."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise RuntimeError(
            "espeakng-loader is not installed in this environment ({}); install it with "
            "`pip install -r {}` or pass library= and data= paths to libespeak-ng and "
            "espeak-ng-data".format(sys.executable, os.path.join(
                os.path.dirname(os.path.abspath(__file__)), "requirements.txt"))) from exc
    library = espeakng_loader.get_library_path()
    try:
        data = espeakng_loader.get_data_path()
    except RuntimeError as exc:  # the wheel raises when its data directory is missing
        raise RuntimeError("espeakng-loader has no espeak-ng-data: {}; reinstall it with "
                           "`pip install --force-reinstall espeakng-loader`".format(exc)) from exc
    return library, data


def _read_languages(address):
    """The language codes of an espeak_VOICE.languages list, best priority first."""
    found = []
    if not address:
        return found
    while True:
        priority = ctypes.string_at(address, 1)[0]
        if priority == 0:
            return found
        language = ctypes.string_at(address + 1)
        found.append((priority, language.decode("utf-8", "replace")))
        address += len(language) + 2


def _dictionary_of(data, identifier):
    """The dictionary NAME (file <data>/NAME_dict) a voice file loads, as espeak-ng's
    voices.c picks it: its first language up to a '-', unless a later `dictionary`
    line names another. None where the voice file is not found."""
    for folder in ("lang", "voices"):
        path = os.path.join(data, folder, *identifier.split("/"))
        if os.path.isfile(path):
            break
    else:
        return None
    dictionary, language_seen = None, False
    with open(path, "rb") as handle:
        for line in handle:
            words = line.decode("utf-8", "replace").split()
            if len(words) >= 2 and words[0] == "language" and not language_seen:
                dictionary, language_seen = words[1].split("-", 1)[0], True
            elif len(words) >= 2 and words[0] == "dictionary":
                dictionary = words[1]
    return dictionary


def _some(names, limit=30):
    """names, comma-separated, at most `limit` of them: an error message stays readable."""
    if len(names) <= limit:
        return ", ".join(names)
    return "{}, ... ({} in all; the voices operation lists them)".format(
        ", ".join(names[:limit]), len(names))


def _to_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArguments("tts: {} must be an integer from {} to {}, not {}".format(
            name, low, high, type(value).__name__))
    if isinstance(value, float):
        if not value.is_integer():
            raise BadArguments("tts: {} must be a whole number from {} to {}, not {}".format(
                name, low, high, value))
        value = int(value)
    if not low <= value <= high:
        raise BadArguments("tts: {} must be from {} to {}, not {}".format(name, low, high, value))
    return value


def _is_cancelled(ctx):
    """Whether the call was cancelled (through ctx.check_cancelled, which raises)."""
    try:
        ctx.check_cancelled()
    except Cancelled:
        return True
    return False


def _le16(raw):
    """int16 samples in native order -> little-endian bytes."""
    if sys.byteorder == "little":
        return raw
    import array
    samples = array.array("h")
    samples.frombytes(raw)
    samples.byteswap()
    return samples.tobytes()


class _Job(object):
    """What the synthesis callback needs for one espeak_Synth call."""

    def __init__(self, n_chars, on_audio, on_progress, should_stop):
        self.n_chars = max(1, n_chars)
        self.on_audio = on_audio
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.samples = 0
        self.consumed = 0  # characters of the text the events have passed
        self.reported = 0.0
        self.aborted = False
        self.error = None


class EspeakEngine(Engine):
    """Text to int16 mono PCM with espeak-ng; see README.md for the operations."""

    def __init__(self, voice="en", rate=175, pitch=50, library=None, data=None, **options):
        super(EspeakEngine, self).__init__(voice=voice, rate=rate, pitch=pitch,
                                           library=library, data=data, **options)
        if not isinstance(voice, str) or not voice.strip():
            raise ValueError("espeak: voice must be a voice name such as 'en', not {!r}".format(
                voice))
        for name, value, (low, high) in (("rate", rate, RATE_RANGE),
                                         ("pitch", pitch, PITCH_RANGE)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError("espeak: {} must be an integer from {} to {}, not {!r}".format(
                    name, low, high, value))
        self.voice = voice.strip()
        self.rate = rate
        self.pitch = pitch
        # Overrides of the espeakng-loader wheel's files (None: the wheel's): the
        # libespeak-ng shared library, and espeak-ng-data or its parent.
        self.library_path = library
        self.data_path = data
        self.library_in_use = None
        self.loads = 0
        self.sample_rate = None
        self.version = None
        self._lib = None
        self._callback = None  # the CFUNCTYPE object: kept so it is not collected
        self._job = None
        self._lock = threading.Lock()  # espeak is not thread-safe
        self._voices = []  # language codes of the voices that load, sorted
        # lowercase spelling (code, voice name, identifier) -> the identifier of
        # the voice: espeak_SetVoiceByName takes voice files, not language codes
        # ("en-gb" is a language of the file gmw/en; it has no file of its own).
        self._aliases = {}
        self._left_out = {}  # lowercase spelling of a listed voice that does not load -> why
        self._variants = {}  # lowercase variant -> its file name
        self._default_voice = None

    # --- lifecycle -------------------------------------------------------------

    def load(self):
        global _owner
        with self._lock:
            if self._lib is not None:
                return
            library, data = self._paths()
            with _OWNER_LOCK:
                other = _owner() if _owner is not None else None
                if other is not None and other is not self:
                    raise RuntimeError("espeak: another EspeakEngine is loaded in this process; "
                                       "libespeak-ng is process-global, unload that one first")
                try:
                    lib = ctypes.CDLL(library)
                except OSError as exc:
                    raise RuntimeError("espeak: cannot load libespeak-ng from {}: {}".format(
                        library, exc)) from exc
                self._declare(lib)
                sample_rate = self._initialize(lib, data)
                try:
                    self._callback = _SynthCallback(self._on_synth)
                    lib.espeak_SetSynthCallback(self._callback)
                    self.version = lib.espeak_Info(None).decode("ascii", "replace")
                    self._list_voices(lib, data)
                    self._default_voice = self._resolve_voice(self.voice, ValueError)
                    self._apply(lib, self._default_voice, self.rate, self.pitch)
                except BaseException:
                    lib.espeak_Terminate()
                    self._callback = None
                    raise
                self._lib = lib
                self.library_in_use = library
                self.sample_rate = int(sample_rate)
                _owner = weakref.ref(self)
            self.loads += 1

    def _paths(self):
        """(library, data directory), checked to exist; RuntimeError names what is missing."""
        library, data = self.library_path, self.data_path
        if library is None or data is None:
            default_library, default_data = _default_paths()
            library = library or default_library
            data = data or default_data
        library, data = os.path.abspath(library), os.path.abspath(data)
        nested = os.path.join(data, "espeak-ng-data")
        if not os.path.isfile(os.path.join(data, "phontab")) and os.path.isdir(nested):
            data = nested  # given the parent, as espeak_Initialize's own `path` is documented
        if not os.path.isfile(library):
            raise RuntimeError("espeak: libespeak-ng not found at {}".format(library))
        if not os.path.isfile(os.path.join(data, "phontab")):
            raise RuntimeError("espeak: {} is not an espeak-ng-data directory (it has no "
                               "phontab)".format(data))
        return library, data

    @staticmethod
    def _initialize(lib, data):
        """Initialize for synchronous output; the sample rate. RuntimeError if it fails.

        espeak-ng 1.52 takes the data directory or its parent, older releases
        only the parent: try the data directory, then its parent. The status
        comes from espeak-ng's own API (espeak_ng.h), which espeak_Initialize
        wraps: espeak_Initialize hides a failure (exit(1) without DONT_EXIT,
        else it returns 0, or the previous sample rate once the library was
        initialized before) and the library segfaults later on half-loaded data.
        """
        tried = []
        for candidate in (data, os.path.dirname(data)):
            path = candidate.encode(sys.getfilesystemencoding())
            if not hasattr(lib, "espeak_ng_Initialize"):  # espeak-ng < 1.49
                sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, path,
                                                    espeakINITIALIZE_DONT_EXIT)
                tried.append("{}: sample rate {}".format(candidate, sample_rate))
                if sample_rate > 0:
                    return sample_rate
            else:
                lib.espeak_ng_InitializePath(path)
                context = ctypes.c_void_p()
                status = lib.espeak_ng_Initialize(ctypes.byref(context))
                lib.espeak_ng_ClearErrorContext(ctypes.byref(context))
                if status == ENS_OK:
                    status = lib.espeak_ng_InitializeOutput(ENOUTPUT_MODE_SYNCHRONOUS, BUFFER_MS,
                                                            None)
                sample_rate = lib.espeak_ng_GetSampleRate() if status == ENS_OK else 0
                if sample_rate > 0:
                    return sample_rate
                message = ctypes.create_string_buffer(512)
                lib.espeak_ng_GetStatusCodeMessage(status, message, len(message))
                tried.append("{}: {}".format(candidate, message.value.decode("utf-8", "replace")))
            lib.espeak_Terminate()
        raise RuntimeError("espeak: cannot initialize libespeak-ng with data {} ({})".format(
            data, "; ".join(tried)))

    def unload(self):
        global _owner
        with self._lock:
            if self._lib is None:
                return
            try:
                self._lib.espeak_Terminate()
            finally:
                self._lib = None
                self._callback = None
                self._job = None
                with _OWNER_LOCK:
                    if _owner is not None and _owner() is self:
                        _owner = None

    def describe(self):
        return {
            "engine": "espeak-ng",
            "version": self.version,
            "sample_rate": self.sample_rate,
            "library": self.library_in_use or self.library_path,
            "voices": len(self._voices),
        }

    # --- operations ------------------------------------------------------------

    @operation
    def voices(self, ctx):
        """The voice names `tts` accepts (language codes; 'name+variant' works too)."""
        self._require_loaded()
        return list(self._voices)

    @operation
    def tts(self, ctx, text, voice=None, rate=None, pitch=None):
        """Speak `text`: int16 little-endian mono PCM, or a stream of chunks when ctx.stream."""
        self._require_loaded()
        if not isinstance(text, str):
            raise BadArguments("tts: text must be a string, not {}".format(type(text).__name__))
        if not text.strip():
            raise BadArguments("tts: text is empty; pass the words to speak")
        if len(text) > MAX_TEXT_CHARS:
            raise BadArguments("tts: text has {} characters, more than the {} allowed; split it "
                               "into several calls".format(len(text), MAX_TEXT_CHARS))
        if "\x00" in text:
            raise BadArguments("tts: text contains a NUL character; remove it")
        if voice is None:
            voice = self._default_voice
        else:
            if not isinstance(voice, str):
                raise BadArguments("tts: voice must be a string such as 'en', not {}".format(
                    type(voice).__name__))
            voice = self._resolve_voice(voice, BadArguments)
        rate = self.rate if rate is None else _to_int("rate", rate, *RATE_RANGE)
        pitch = self.pitch if pitch is None else _to_int("pitch", pitch, *PITCH_RANGE)
        ctx.check_cancelled()
        if getattr(ctx, "stream", False):
            return self._stream(ctx, text, voice, rate, pitch)
        return self._whole(ctx, text, voice, rate, pitch)

    # --- synthesis -------------------------------------------------------------

    def _whole(self, ctx, text, voice, rate, pitch):
        audio = bytearray()
        ctx.progress(0.0, "synthesize", "speaking {} characters".format(len(text)))
        samples, sample_rate = self._synthesize(
            text, voice, rate, pitch, audio.extend,
            lambda fraction: ctx.progress(fraction, "synthesize"),
            lambda: _is_cancelled(ctx))
        ctx.progress(1.0, "synthesize", "done")
        return {"audio": bytes(audio), "sample_rate": sample_rate, "format": "s16le",
                "channels": 1, "samples": samples}

    def _stream(self, ctx, text, voice, rate, pitch):
        """A generator: chunks of ~STREAM_CHUNK_S as espeak produces them, then a summary.

        espeak_Synth runs to the end inside one C call, so it runs on a helper
        thread that hands chunks over a queue; progress goes over the queue
        too, so that ctx is only used from the thread iterating the generator.
        """
        items = queue.Queue()
        stop = threading.Event()
        chunk_bytes = 2 * max(1, int(self.sample_rate * STREAM_CHUNK_S))
        pending = bytearray()

        def on_audio(raw):
            pending.extend(raw)
            if len(pending) >= chunk_bytes:
                items.put(("audio", bytes(pending)))
                del pending[:]

        def synthesize():
            try:
                outcome = self._synthesize(
                    text, voice, rate, pitch, on_audio,
                    lambda fraction: items.put(("progress", fraction)),
                    lambda: stop.is_set() or _is_cancelled(ctx))
                if pending:
                    items.put(("audio", bytes(pending)))
                items.put(("done", outcome))
            except BaseException as exc:  # handed to the consumer, never lost
                items.put(("error", exc))

        def generate():
            chunks = 0
            ctx.progress(0.0, "synthesize", "speaking {} characters".format(len(text)))
            worker = threading.Thread(target=synthesize, name="espeak-synth")
            worker.daemon = True
            worker.start()
            try:
                while True:
                    try:
                        kind, value = items.get(timeout=1.0)
                    except queue.Empty:
                        if not worker.is_alive() and items.empty():
                            raise RuntimeError("espeak: the synthesis thread ended without "
                                               "a result")
                        continue
                    if kind == "audio":
                        chunks += 1
                        yield {"audio": value, "sample_rate": self.sample_rate}
                    elif kind == "progress":
                        ctx.progress(value, "synthesize")
                    elif kind == "error":
                        raise value
                    else:
                        samples, sample_rate = value
                        break
            finally:
                stop.set()  # the consumer went away or failed: abort the synthesis
                worker.join()
            ctx.progress(1.0, "synthesize", "done")
            return {"sample_rate": sample_rate, "format": "s16le", "channels": 1,
                    "samples": samples, "chunks": chunks}

        return generate()

    def _synthesize(self, text, voice, rate, pitch, on_audio, on_progress, should_stop):
        """Run espeak_Synth; (samples, sample_rate). Raises Cancelled when should_stop()."""
        data = text.encode("utf-8") + b"\x00"
        job = _Job(len(text), on_audio, on_progress, should_stop)
        with self._lock:
            lib = self._require_loaded()
            self._apply(lib, voice, rate, pitch)
            self._job = job
            try:
                status = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, espeakCHARS_UTF8,
                                          None, None)
                if status == EE_OK:
                    status = lib.espeak_Synchronize()
            finally:
                self._job = None
            sample_rate = self.sample_rate
        if job.error is not None:
            raise job.error
        if job.aborted:
            raise Cancelled("the call was cancelled during synthesis")
        if status != EE_OK:
            raise RuntimeError("espeak: espeak_Synth failed with {}".format(
                _ERRORS.get(status, status)))
        return job.samples, sample_rate

    def _on_synth(self, wav, numsamples, events):
        """The C callback: collect audio, follow positions; 1 aborts the synthesis."""
        job = self._job
        if job is None:
            return 0
        try:
            if events:
                i = 0
                while True:
                    event = events[i]
                    if event.type == espeakEVENT_LIST_TERMINATED:
                        break
                    if event.type in (espeakEVENT_WORD, espeakEVENT_SENTENCE, espeakEVENT_END):
                        job.consumed = max(job.consumed, event.text_position - 1)
                    if event.type == espeakEVENT_MSG_TERMINATED:
                        break
                    i += 1
            if wav and numsamples > 0:
                job.on_audio(_le16(ctypes.string_at(wav, 2 * numsamples)))
                job.samples += numsamples
            fraction = min(1.0, float(job.consumed) / job.n_chars)
            if fraction - job.reported >= _PROGRESS_STEP:
                job.reported = fraction
                job.on_progress(fraction)
            if job.should_stop():
                job.aborted = True
                return 1
            return 0
        except BaseException as exc:  # an exception must not cross into C
            job.error = exc
            return 1

    # --- helpers -----------------------------------------------------------------

    @staticmethod
    def _declare(lib):
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.argtypes = []
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        if hasattr(lib, "espeak_ng_Initialize"):
            lib.espeak_ng_InitializePath.argtypes = [ctypes.c_char_p]
            lib.espeak_ng_InitializePath.restype = None
            lib.espeak_ng_Initialize.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.espeak_ng_Initialize.restype = ctypes.c_int
            lib.espeak_ng_ClearErrorContext.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
            lib.espeak_ng_ClearErrorContext.restype = None
            lib.espeak_ng_InitializeOutput.argtypes = [ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_char_p]
            lib.espeak_ng_InitializeOutput.restype = ctypes.c_int
            lib.espeak_ng_GetSampleRate.argtypes = []
            lib.espeak_ng_GetSampleRate.restype = ctypes.c_int
            lib.espeak_ng_GetStatusCodeMessage.argtypes = [ctypes.c_int, ctypes.c_char_p,
                                                           ctypes.c_size_t]
            lib.espeak_ng_GetStatusCodeMessage.restype = None

    def _list_voices(self, lib, data):
        """The voices that really load: in the list, with their dictionary, accepted by
        espeak_SetVoiceByName. Each language code names its best voice (espeak's
        priority: lower is better)."""
        best, aliases, left_out = {}, {}, {}

        def each(spec):
            voices = lib.espeak_ListVoices(spec)
            i = 0
            while voices and voices[i]:
                yield voices[i].contents
                i += 1

        for order, voice in enumerate(each(None)):
            name = (voice.name or b"").decode("utf-8", "replace").strip()
            identifier = (voice.identifier or b"").decode("utf-8", "replace")
            if not identifier:
                continue
            # A voice whose dictionary the data lacks loads, but speaks silence.
            dictionary = _dictionary_of(data, identifier)
            why = None
            if dictionary is not None and not os.path.isfile(
                    os.path.join(data, dictionary + "_dict")):
                why = "{} has no {}_dict".format(name or identifier, dictionary)
            elif lib.espeak_SetVoiceByName(identifier.encode("utf-8")) != EE_OK:
                why = "espeak_SetVoiceByName({!r}) fails".format(identifier)
            if why is not None:
                for spelling in [name, identifier] + [c for _, c in _read_languages(
                        voice.languages)]:
                    left_out.setdefault(spelling.lower(), why)
                continue
            for rank, (priority, code) in enumerate(_read_languages(voice.languages)):
                key = (priority, rank, order)
                if code.lower() not in best or key < best[code.lower()][0]:
                    best[code.lower()] = (key, identifier)
            for spelling in (name, identifier):
                if spelling:
                    aliases.setdefault(spelling.lower(), identifier)
        for code, (_, identifier) in best.items():
            aliases[code] = identifier
        spec = _Voice()
        language = ctypes.create_string_buffer(b"variant")
        spec.languages = ctypes.cast(language, ctypes.c_void_p).value
        variants = {}
        for voice in each(ctypes.byref(spec)):
            identifier = (voice.identifier or b"").decode("utf-8", "replace")
            variant = identifier.rsplit("/", 1)[-1]
            if variant:
                variants[variant.lower()] = variant
        if not best:
            raise RuntimeError("espeak: espeak_ListVoices found no voices that load; is the "
                               "data directory {} complete?".format(data))
        self._voices = sorted(best)
        self._aliases = aliases
        self._left_out = {spelling: why for spelling, why in left_out.items()
                          if spelling and spelling not in aliases}
        if left_out:
            log.info("espeak: voices left out, as this data cannot speak them: %s",
                     "; ".join(sorted(set(left_out.values()))))
        self._variants = variants

    def _resolve_voice(self, voice, error):
        """The name for espeak_SetVoiceByName; `error` (a class) names close and valid ones."""
        spelled = voice.strip()
        base, plus, variant = spelled.partition("+")
        resolved = self._aliases.get(base.strip().lower())
        if resolved is None:
            why = self._left_out.get(base.strip().lower())
            close = self._close_voices(base.strip().lower())
            raise error("{}; {}valid voices: {}".format(
                "voice {!r} cannot speak with this espeak-ng-data ({})".format(voice, why)
                if why else "unknown voice {!r}".format(voice),
                ("close names: " + ", ".join(close) + "; ") if close else "",
                _some(self._voices)))
        if plus:
            found = self._variants.get(variant.strip().lower())
            if found is None:
                close = difflib.get_close_matches(variant.strip().lower(), list(self._variants),
                                                  n=5, cutoff=0.5)
                raise error("unknown voice variant {!r} in {!r}; {}valid variants: {}".format(
                    variant, voice, ("close names: " + ", ".join(close) + "; ") if close else "",
                    _some(sorted(self._variants.values(), key=str.lower))))
            resolved = resolved + "+" + found
        return resolved

    def _close_voices(self, wanted, n=5):
        """Known spellings close to `wanted`: codes, display names, and names by first word."""
        # Language codes and display names ("english (america)"), not "gmw/en-us".
        candidates = [spelling for spelling in self._aliases if "/" not in spelling]
        words = {}
        for spelling in candidates:
            word = spelling.split(" ", 1)[0]
            if word != spelling:
                words.setdefault(word, []).append(spelling)
        close = []
        for match in difflib.get_close_matches(wanted, candidates + list(words), n=n,
                                               cutoff=0.5):
            for spelling in sorted(words.get(match, [match]))[:3]:
                if spelling not in close:
                    close.append(spelling)
        return close[:n]

    def _apply(self, lib, voice, rate, pitch):
        status = lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if status != EE_OK:
            raise RuntimeError("espeak: espeak_SetVoiceByName({!r}) failed with {}".format(
                voice, _ERRORS.get(status, status)))
        for parameter, value in ((espeakRATE, rate), (espeakPITCH, pitch)):
            status = lib.espeak_SetParameter(parameter, int(value), 0)
            if status != EE_OK:
                raise RuntimeError("espeak: espeak_SetParameter({}, {}) failed with {}".format(
                    parameter, value, _ERRORS.get(status, status)))

    def _require_loaded(self):
        lib = self._lib
        if lib is None:
            raise RuntimeError("espeak: the engine is not loaded; call load() first")
        return lib
