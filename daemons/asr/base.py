"""What every speech recognizer of modelhost serves: the operations, their checks, sessions.

An engine subclasses AsrEngine and supplies a *recognizer*: an object that
takes 16 kHz float32 mono audio chunk by chunk and says what it heard,

    recognizer = engine._recognizer(language, live)
    recognizer.feed(ctx, samples)       # any number of times
    recognizer.partial(ctx) -> str      # the hypothesis so far
    recognizer.finish(ctx) -> {"text", "segments", "words", "language"}
    recognizer.close()                  # always, also after an error

(`live`: whether partial() will be asked; a recognizer may skip work otherwise.)

AsrEngine turns that into the operations (see README.md): `transcribe`,
`transcribe_stream` (a generator of partial hypotheses) and the streaming
sessions `stream_start` / `stream_feed` / `stream_end`. Audio decoding and
resampling are audio.py's. An engine whose model wants the whole signal at
once (Whisper) overrides `_decode` as well.

Sessions live in the daemon's memory: bounded in number (`max_sessions`)
and in idle time (`session_idle_s`, measured on `self._clock`, which tests
replace), and lost when the daemon unloads its model; a call on a session
that is gone is `bad_arguments` saying why.

Runs on Python 3.7 with numpy.
"""

import collections
import threading
import time
import uuid

from modelhost.daemons.engine import BadArguments, Engine, operation

from . import audio

DEFAULT_MAX_SESSIONS = 4
DEFAULT_SESSION_IDLE_S = 60.0
DEFAULT_MAX_AUDIO_S = 3600.0
CHUNK_S_RANGE = (0.05, 30.0)
# transcribe feeds the recognizer this much audio at a time (progress, cancellation).
TRANSCRIBE_CHUNK_S = 1.0
PROGRESS_STEP = 0.05
# How many ended or expired session ids are remembered, to say why they are gone.
REMEMBERED_ENDED = 1024


def check_int(options, name, low, high, problems, what):
    value = options.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.append("{}: option {!r} must be an integer from {} to {}, not {!r}".format(
            what, name, low, high, value))


def check_number(options, name, low, high, problems, what):
    value = options.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        problems.append("{}: option {!r} must be a number over {} and at most {}, not {!r}"
                        .format(what, name, low, high, value))


def check_bool(options, name, problems, what):
    value = options.get(name)
    if value is not None and not isinstance(value, bool):
        problems.append("{}: option {!r} must be true or false, not {!r}".format(
            what, name, value))


def check_path(options, name, problems, what):
    value = options.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        problems.append("{}: option {!r} must be a path, not {!r}".format(what, name, value))


def session_option_problems(options, what):
    problems = []
    check_int(options, "max_sessions", 1, 256, problems, what)
    check_number(options, "session_idle_s", 0, 86400, problems, what)
    check_number(options, "max_audio_s", 0, 86400, problems, what)
    return problems


def unknown_option_problems(options, accepted, what):
    return ["{}: unknown option {!r}; the options are: {}".format(
        what, name, ", ".join(sorted(accepted))) for name in sorted(set(options) - set(accepted))]


def result_map(text, language, duration_s, segments, words):
    return {"text": text, "language": language, "duration_s": round(float(duration_s), 3),
            "segments": segments, "words": words}


class _Session(object):
    def __init__(self, session_id, sample_rate, language, resampler, recognizer, now):
        self.id = session_id
        self.sample_rate = sample_rate
        self.language = language
        self.resampler = resampler
        self.recognizer = recognizer
        self.last_used = now
        self.received = 0  # input samples, at sample_rate
        # One call at a time per session, also with `concurrency` > 1.
        self.lock = threading.Lock()


class AsrEngine(Engine):
    """The operations over a recognizer; subclasses implement _load, _unload, _recognizer."""

    NAME = "asr"

    def __init__(self, max_sessions=DEFAULT_MAX_SESSIONS, session_idle_s=DEFAULT_SESSION_IDLE_S,
                 max_audio_s=DEFAULT_MAX_AUDIO_S, **options):
        super(AsrEngine, self).__init__(max_sessions=max_sessions,
                                        session_idle_s=session_idle_s,
                                        max_audio_s=max_audio_s, **options)
        self.max_sessions = max_sessions
        self.session_idle_s = float(session_idle_s)
        self.max_audio_s = float(max_audio_s)
        self.loads = 0
        self.loaded = False
        # The language codes `language=` accepts (lowercase) -> what the recognizer is
        # given; None stands for "no language given".
        self._languages = {}
        self._clock = time.monotonic
        self._sessions = {}
        self._ended = collections.OrderedDict()  # session id -> why it is gone
        self._sessions_lock = threading.Lock()
        self._lifecycle = threading.Lock()

    # --- for subclasses ------------------------------------------------------------

    def _load(self):
        """Load the model; return {accepted language spelling: recognizer language}."""
        raise NotImplementedError

    def _unload(self):
        raise NotImplementedError

    def _recognizer(self, language, live):
        raise NotImplementedError

    def _describe(self):
        return {}

    # --- lifecycle -------------------------------------------------------------------

    def load(self):
        with self._lifecycle:
            if self.loaded:
                return
            self._languages = self._load()
            self.loaded = True
            self.loads += 1

    def unload(self):
        with self._lifecycle:
            if not self.loaded:
                return
            self._close_sessions("was closed when the daemon unloaded its model")
            self.loaded = False
            self._unload()

    def describe(self):
        facts = {"sample_rate": audio.TARGET_RATE,
                 "resampler": "soxr" if audio.soxr is not None else "numpy",
                 "file_decoder": "soundfile" if audio.soundfile is not None else "wave",
                 "sessions": len(self._sessions), "max_sessions": self.max_sessions}
        facts.update(self._describe())
        return facts

    def _require_loaded(self):
        if not self.loaded:
            raise RuntimeError("{}: the engine is not loaded; call load() first".format(
                self.NAME))

    # --- operations -----------------------------------------------------------------

    @operation
    def transcribe(self, ctx, audio=None, sample_rate=None, language=None):
        """The text of `audio` (see audio.py for what it may be), with segments and words."""
        self._require_loaded()
        samples, duration = self._prepare(audio, sample_rate, "transcribe")
        language = self._language(language, "transcribe")
        decoding = self._decode(ctx, samples, language, TRANSCRIBE_CHUNK_S, live=False)
        while True:
            try:
                next(decoding)
            except StopIteration as stop:
                return self._final(stop.value, duration)

    @operation
    def transcribe_stream(self, ctx, audio=None, sample_rate=None, chunk_s=0.5, language=None):
        """A generator: {"partial": text so far} as decoding goes on, then transcribe's map."""
        self._require_loaded()
        if isinstance(chunk_s, bool) or not isinstance(chunk_s, (int, float)) \
                or not CHUNK_S_RANGE[0] <= chunk_s <= CHUNK_S_RANGE[1]:
            raise BadArguments("transcribe_stream: chunk_s must be a number of seconds from {} "
                               "to {}, not {!r}".format(CHUNK_S_RANGE[0], CHUNK_S_RANGE[1],
                                                        chunk_s))
        samples, duration = self._prepare(audio, sample_rate, "transcribe_stream")
        language = self._language(language, "transcribe_stream")

        def generate():
            decoding = self._decode(ctx, samples, language, float(chunk_s), live=True)
            while True:
                try:
                    text = next(decoding)
                except StopIteration as stop:
                    return self._final(stop.value, duration)
                yield {"partial": text}

        return generate()

    @operation
    def stream_start(self, ctx, sample_rate=None, language=None):
        """Open a streaming session for audio at `sample_rate`; its id (a string)."""
        self._require_loaded()
        if sample_rate is None:
            raise BadArguments("stream_start: sample_rate is required: the rate of the audio "
                               "stream_feed will get")
        sample_rate = audio.check_rate(sample_rate, "stream_start")
        language = self._language(language, "stream_start")
        with self._sessions_lock:
            self._expire()
            if len(self._sessions) >= self.max_sessions:
                raise BadArguments(
                    "stream_start: {} streaming sessions are open, the most this daemon keeps "
                    "(max_sessions); end one with stream_end, or wait: a session idle for "
                    "{:g} s expires".format(len(self._sessions), self.session_idle_s))
            session_id = uuid.uuid4().hex
            # Reserved under the lock; the recognizer (maybe slow to make) is made outside.
            self._sessions[session_id] = None
        try:
            recognizer = self._recognizer(language, True)
        except BaseException:
            with self._sessions_lock:
                self._sessions.pop(session_id, None)
            raise
        session = _Session(session_id, sample_rate, language,
                           audio.resampler(sample_rate), recognizer, self._clock())
        with self._sessions_lock:
            self._sessions[session_id] = session
        return session_id

    @operation
    def stream_feed(self, ctx, session=None, audio=None):
        """Add audio to a session (raw 16-bit PCM or an array at its rate, or a WAV/FLAC file
        at its rate): {"partial": the hypothesis so far, "duration_s": audio so far}."""
        entry = self._session(session, "stream_feed")
        with entry.lock:
            self._check_open(entry, "stream_feed")
            samples, _ = self._samples_of(audio, entry.sample_rate, "stream_feed")
            if (entry.received + len(samples)) / float(entry.sample_rate) > self.max_audio_s:
                raise BadArguments("stream_feed: the session would hold more than {:g} s of "
                                   "audio (max_audio_s); end it with stream_end and start "
                                   "another".format(self.max_audio_s))
            try:
                if len(samples):
                    entry.recognizer.feed(ctx, entry.resampler.feed(samples))
                    entry.received += len(samples)
                text = entry.recognizer.partial(ctx)
            except BadArguments:
                raise
            except BaseException:
                self._end(entry, "failed in the recognizer")
                raise
            entry.last_used = self._clock()
            return {"partial": text, "duration_s": round(entry.received / float(
                entry.sample_rate), 3)}

    @operation
    def stream_end(self, ctx, session=None):
        """Close a session: transcribe's map for all the audio it was fed."""
        entry = self._session(session, "stream_end")
        with entry.lock:
            self._check_open(entry, "stream_end")
            try:
                tail = entry.resampler.finish()
                if len(tail):
                    entry.recognizer.feed(ctx, tail)
                result = entry.recognizer.finish(ctx)
            finally:
                self._end(entry, "has ended (stream_end)")
            return self._final(result, entry.received / float(entry.sample_rate))

    # --- decoding ---------------------------------------------------------------------

    def _decode(self, ctx, samples, language, chunk_s, live):
        """A generator: the partial hypothesis after each chunk (when it changed); returns
        the recognizer's final map. Reports progress and honours cancellation."""
        recognizer = self._recognizer(language, live)
        try:
            total = len(samples)
            step = max(1, int(round(chunk_s * audio.TARGET_RATE)))
            ctx.progress(0.0, "transcribe", "transcribing {:.1f} s of audio".format(
                total / float(audio.TARGET_RATE)))
            reported, last = 0.0, ""
            for start in range(0, total, step):
                ctx.check_cancelled()
                recognizer.feed(ctx, samples[start:start + step])
                fraction = min(1.0, (start + step) / float(total))
                if fraction - reported >= PROGRESS_STEP and fraction < 1.0:
                    reported = fraction
                    ctx.progress(fraction, "transcribe")
                text = recognizer.partial(ctx)
                if text != last:
                    last = text
                    yield text
            ctx.check_cancelled()
            result = recognizer.finish(ctx)
            ctx.progress(1.0, "transcribe", "done")
            return result
        finally:
            recognizer.close()

    # --- arguments --------------------------------------------------------------------

    def _samples_of(self, value, sample_rate, what):
        if value is None:
            raise BadArguments("{}: audio is required".format(what))
        return audio.decode(value, sample_rate, what)

    def _prepare(self, value, sample_rate, what):
        """(16 kHz samples, duration in seconds) of a whole recording; BadArguments when it is
        no audio, empty, or too long."""
        samples, rate = self._samples_of(value, sample_rate, what)
        if not len(samples):
            raise BadArguments("{}: the audio is empty (0 samples); send some speech".format(
                what))
        duration = len(samples) / float(rate)
        if duration > self.max_audio_s:
            raise BadArguments("{}: the audio is {:.1f} s long, more than the {:g} s allowed "
                               "(max_audio_s); split it, or use a streaming session".format(
                                   what, duration, self.max_audio_s))
        return audio.resample(samples, rate), duration

    def _language(self, value, what):
        if value is None:
            return self._languages.get(None)
        if not isinstance(value, str):
            raise BadArguments("{}: language must be a language code such as 'en', not "
                               "{}".format(what, type(value).__name__))
        key = value.strip().lower().replace("_", "-")
        for spelling in (key, key.split("-", 1)[0]):  # "en-US": the model's "en"
            if spelling in self._languages:
                return self._languages[spelling]
        valid = sorted(code for code in self._languages if code is not None)
        shown = ", ".join(valid[:40]) + (", ..." if len(valid) > 40 else "")
        raise BadArguments("{}: language {!r} is not one this model speaks; valid: {}".format(
            what, value, shown))

    def _final(self, result, duration):
        return result_map(result["text"], result.get("language"), duration,
                          result["segments"], result["words"])

    # --- sessions ---------------------------------------------------------------------

    def _session(self, session_id, what):
        self._require_loaded()
        if not isinstance(session_id, str) or not session_id:
            raise BadArguments("{}: session must be the id stream_start returned, not "
                               "{!r}".format(what, session_id))
        with self._sessions_lock:
            self._expire()
            entry = self._sessions.get(session_id)
            if entry is not None:
                return entry
            why = self._ended.get(session_id)
        if why is not None:
            raise BadArguments("{}: session {!r} {}; start a new one with stream_start".format(
                what, session_id, why))
        raise BadArguments("{}: no streaming session {!r} here (never started, or ended before "
                           "the daemon restarted); start one with stream_start".format(
                               what, session_id))

    def _check_open(self, entry, what):
        """Raise when the session ended while this call waited for its lock."""
        with self._sessions_lock:
            if self._sessions.get(entry.id) is entry:
                return
            why = self._ended.get(entry.id, "has ended")
        raise BadArguments("{}: session {!r} {}; start a new one with stream_start".format(
            what, entry.id, why))

    def _expire(self):
        """Close sessions idle for longer than session_idle_s (under _sessions_lock)."""
        now = self._clock()
        for entry in list(self._sessions.values()):
            if entry is None or now - entry.last_used <= self.session_idle_s:
                continue
            if not entry.lock.acquire(False):  # in a call right now: not idle
                continue
            try:
                self._forget(entry, "expired after {:g} s without a call (session_idle_s)"
                             .format(self.session_idle_s))
            finally:
                entry.lock.release()

    def _end(self, entry, why):
        with self._sessions_lock:
            if self._sessions.get(entry.id) is entry:
                self._forget(entry, why)

    def _forget(self, entry, why):
        """Drop a session and remember why (under _sessions_lock)."""
        self._sessions.pop(entry.id, None)
        self._ended[entry.id] = why
        while len(self._ended) > REMEMBERED_ENDED:
            self._ended.popitem(last=False)
        entry.recognizer.close()

    def _close_sessions(self, why):
        # Called from unload(): the runtime runs no call during a tier move, so no
        # session lock is held (and taking one here, under _sessions_lock, would
        # invert the order stream_feed takes them in).
        with self._sessions_lock:
            for entry in list(self._sessions.values()):
                if entry is not None:
                    self._forget(entry, why)
