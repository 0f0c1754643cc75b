"""Speech recognition (daemons/asr): pocketsphinx for real, faster-whisper without weights.

In-process on the host interpreter: the pocketsphinx engine (its wheel is in
the test extra) transcribes speech made by the espeak engine, which is the
only speech a test can make here. pocketsphinx is weak on espeak's voice, so
the tests speak digits, which it hears reliably ("two three four five" at
every rate tried), and assert on those words. No Whisper weights here: the
faster-whisper engine's logic runs against tests/standins/faster_whisper.py,
and the real faster-whisper (in a venv of its requirements) on
tests/data/tiny-whisper, a model of random weights.

End to end: a real `modelhost up` with the espeak and asr daemons, each in
its own venv on Python 3.12; and the modules the asr daemon imports on the
Python 3.7 test venv (no soxr, no soundfile there: the fallbacks).
"""

import io
import json
import os
import subprocess
import sys
import threading
import wave

import numpy
import pytest
import soundfile

import pocketsphinx  # noqa: F401 (in the test extra: a missing one must fail, not skip)

import modelhost
from modelhost.daemons.asr import audio as asr_audio
from modelhost.daemons.asr import pocketsphinx_engine as ps_engine
from modelhost.daemons.asr import whisper_engine
from modelhost.daemons.asr.pocketsphinx_engine import PocketsphinxEngine
from modelhost.daemons.asr.whisper_engine import FasterWhisperEngine
from modelhost.daemons.engine import CallContext, operations_of
from modelhost.daemons.espeak.engine import EspeakEngine
from modelhost.errors import BadArguments, Cancelled

from conftest import ROOT, TEST_STATE, Host, drain
from fakes import FakeClock
from standins import faster_whisper as whisper_standin

DIGITS = "two three four five six"
# What pocketsphinx hears of DIGITS in espeak's en-us voice at 130..175 words a minute;
# the last word varies ("six", "to", "the"), so it is left out.
HEARD = ["two", "three", "four", "five"]
OPERATIONS = {"transcribe", "transcribe_stream", "stream_start", "stream_feed", "stream_end"}


def make_ctx(send=None):
    return CallContext(request_id=1, method="transcribe", stream=False,
                       send=send or (lambda kind, value: None))


class Sent(object):
    """A CallContext's send: records (kind, value)."""

    def __init__(self):
        self.items = []

    def __call__(self, kind, value):
        self.items.append((kind, value))

    def fractions(self):
        return [value["fraction"] for kind, value in self.items if kind == "progress"]


def words_of(result):
    return [w["word"] for w in result["words"]]


def heard_digits(text):
    return all(word in text.split() for word in HEARD)


@pytest.fixture(scope="module")
def tts():
    engine = EspeakEngine(voice="en-us")
    engine.load()
    yield engine
    engine.unload()


@pytest.fixture(scope="module")
def speech(tts):
    """{text: espeak's result} for a few texts, made once."""
    made = {}

    def say(text=DIGITS, rate=150):
        key = (text, rate)
        if key not in made:
            made[key] = tts.tts(make_ctx(), text, rate=rate)
        return made[key]

    return say


@pytest.fixture(scope="module")
def asr():
    engine = PocketsphinxEngine()
    engine.load()
    yield engine
    engine.unload()


def wav_bytes(pcm, rate, channels=1, width=2):
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return out.getvalue()


def samples_of(result):
    return numpy.frombuffer(result["audio"], "<i2").astype(numpy.float32) / 32768.0


# --- pocketsphinx in-process ----------------------------------------------------------


def test_operations_and_describe(asr):
    assert set(operations_of(asr)) == OPERATIONS
    facts = asr.describe()
    assert facts["engine"] == "pocketsphinx" and facts["version"] == "5.0.4"
    assert facts["language"] == "en" and facts["sample_rate"] == 16000
    assert facts["resampler"] == "soxr" and facts["file_decoder"] == "soundfile"
    assert os.path.isdir(facts["model"])
    assert PocketsphinxEngine.preflight({}) == []


def test_transcribe_speech_from_espeak(asr, speech):
    said = speech()
    result = asr.transcribe(make_ctx(), wav_bytes(said["audio"], said["sample_rate"]))
    assert set(result) == {"text", "language", "duration_s", "segments", "words"}
    assert heard_digits(result["text"]), result
    assert result["language"] == "en"
    assert result["duration_s"] == pytest.approx(said["samples"] / 22050.0, abs=0.002)
    assert words_of(result)[:4] == HEARD
    assert " ".join(words_of(result)) == result["text"]
    times = [(w["start"], w["end"]) for w in result["words"]]
    assert all(0 <= start < end <= result["duration_s"] + 0.05 for start, end in times)
    assert times == sorted(times)
    assert [s["text"] for s in result["segments"]] == [result["text"]]
    assert result["segments"][0]["start"] == times[0][0]
    assert result["segments"][0]["end"] == times[-1][1]


def test_silence_and_a_tone_are_not_those_words(asr):
    silence = asr.transcribe(make_ctx(), numpy.zeros(16000, numpy.int16), sample_rate=16000)
    assert silence["text"] == "" and silence["words"] == [] and silence["segments"] == []
    t = numpy.arange(32000) / 16000.0
    tone = asr.transcribe(make_ctx(), (0.3 * numpy.sin(2 * numpy.pi * 440 * t)).astype(
        numpy.float32), sample_rate=16000)
    assert not heard_digits(tone["text"])


def test_every_form_of_audio_gives_the_same_words(asr, speech):
    said = speech()
    pcm, rate = said["audio"], said["sample_rate"]
    samples = samples_of(said)
    flac = io.BytesIO()
    soundfile.write(flac, samples, rate, format="FLAC")
    stereo = numpy.stack([samples, samples], axis=1)
    forms = {
        "wav": dict(audio=wav_bytes(pcm, rate)),
        "flac": dict(audio=flac.getvalue()),
        "raw pcm": dict(audio=pcm, sample_rate=rate),
        "memoryview": dict(audio=memoryview(pcm), sample_rate=rate),
        "int16 array": dict(audio=numpy.frombuffer(pcm, "<i2"), sample_rate=rate),
        "float32 array": dict(audio=samples, sample_rate=rate),
        "float64 stereo": dict(audio=stereo.astype(numpy.float64), sample_rate=float(rate)),
        "int32 array": dict(audio=(samples * 2 ** 31).astype(numpy.int32), sample_rate=rate),
        "stereo wav": dict(audio=wav_bytes((stereo * 32767).astype("<i2").tobytes(), rate,
                                           channels=2)),
    }
    # Not 8 kHz: the model is wideband, and telephone audio lacks what it listens for
    # above 4 kHz (it decodes, to other words).
    for rate_out in (16000, 44100, 48000):
        forms["wav at {}".format(rate_out)] = dict(audio=wav_bytes(asr_audio.to_int16_bytes(
            asr_audio.resample(samples, rate, rate_out)), rate_out))
    for name, arguments in forms.items():
        result = asr.transcribe(make_ctx(), **arguments)
        assert heard_digits(result["text"]), (name, result["text"])


def test_the_fallbacks_without_soundfile_and_soxr(asr, speech, monkeypatch):
    said = speech()
    samples = samples_of(said)
    with_soxr = asr.transcribe(make_ctx(), said["audio"], sample_rate=22050)
    monkeypatch.setattr(asr_audio, "soxr", None)
    monkeypatch.setattr(asr_audio, "soundfile", None)
    assert asr.describe()["resampler"] == "numpy"
    assert asr.describe()["file_decoder"] == "wave"
    for width in (1, 2, 3, 4):
        scaled = numpy.clip(samples * 2 ** (8 * width - 1), -2 ** (8 * width - 1),
                            2 ** (8 * width - 1) - 1).astype(numpy.int64)
        if width == 1:
            raw = (scaled + 128).astype(numpy.uint8).tobytes()
        else:
            raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in scaled)
        result = asr.transcribe(make_ctx(), wav_bytes(raw, 22050, width=width))
        assert heard_digits(result["text"]), (width, result["text"])
    result = asr.transcribe(make_ctx(), said["audio"], sample_rate=22050)
    assert result["text"] == with_soxr["text"]
    flac = io.BytesIO()
    soundfile.write(flac, samples, 22050, format="FLAC")
    with pytest.raises(BadArguments, match="FLAC needs soundfile in the daemon's venv"):
        asr.transcribe(make_ctx(), flac.getvalue())


def test_transcribe_stream_and_a_session_end_as_transcribe_does(asr, speech):
    said = speech()
    whole = asr.transcribe(make_ctx(), said["audio"], sample_rate=22050)
    chunks, streamed = drain(asr.transcribe_stream(make_ctx(), said["audio"], sample_rate=22050,
                                                   chunk_s=0.25))
    assert streamed == whole
    partials = [chunk["partial"] for chunk in chunks]
    assert len(partials) >= 3 and partials[0] and all(partials)
    assert len(set(partials)) == len(partials)  # only changes are sent
    assert any(word in partials[len(partials) // 2] for word in HEARD)

    session = asr.stream_start(make_ctx(), sample_rate=22050)
    assert isinstance(session, str) and len(session) == 32
    fed = []
    step = 2 * 22050 // 5  # 0.2 s of 16-bit samples
    for start in range(0, len(said["audio"]), step):
        fed.append(asr.stream_feed(make_ctx(), session, said["audio"][start:start + step]))
    assert fed[-1]["duration_s"] == pytest.approx(said["samples"] / 22050.0, abs=0.001)
    assert [f["duration_s"] for f in fed] == sorted(f["duration_s"] for f in fed)
    assert any(f["partial"] for f in fed)
    final = asr.stream_end(make_ctx(), session)
    assert final == whole
    assert heard_digits(final["text"])


def test_a_session_takes_arrays_and_wav_files_at_its_rate(asr, speech):
    said = speech()
    samples = samples_of(said)
    session = asr.stream_start(make_ctx(), sample_rate=22050, language="en-US")
    half = len(samples) // 2
    asr.stream_feed(make_ctx(), session, samples[:half])
    asr.stream_feed(make_ctx(), session, wav_bytes(said["audio"][2 * half:], 22050))
    assert asr.stream_feed(make_ctx(), session, b"")["duration_s"] == pytest.approx(
        len(samples) / 22050.0, abs=0.001)
    with pytest.raises(BadArguments, match="wrong rate: the WAV file is at 16000 Hz"):
        asr.stream_feed(make_ctx(), session, wav_bytes(b"\0\0" * 1600, 16000))
    with pytest.raises(BadArguments, match="even number of bytes"):
        asr.stream_feed(make_ctx(), session, b"\0\0\0")
    # Bad audio leaves the session open.
    assert heard_digits(asr.stream_end(make_ctx(), session)["text"])


def test_long_audio_reports_progress_and_is_several_segments(asr, speech, tts):
    said = speech()
    pause = numpy.zeros(22050, numpy.int16).tobytes()  # 1 s between the utterances
    pcm = pause.join([said["audio"]] * 3)
    sent = Sent()
    result = asr.transcribe(make_ctx(sent), pcm, sample_rate=22050)
    fractions = sent.fractions()
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) >= 5
    assert fractions == sorted(fractions)
    assert len(result["segments"]) == 3
    for segment in result["segments"]:
        assert heard_digits(segment["text"]), result["segments"]
    starts = [segment["start"] for segment in result["segments"]]
    utterance = said["samples"] / 22050.0
    for index, start in enumerate(starts):
        assert start == pytest.approx(index * (utterance + 1.0), abs=0.3)


def test_cancel_stops_a_transcription(asr, speech):
    said = speech()
    pcm = said["audio"] * 8
    ctx = make_ctx()
    ctx.cancel()
    with pytest.raises(Cancelled):
        asr.transcribe(ctx, pcm, sample_rate=22050)

    def cancel_on_progress(kind, value):
        if kind == "progress" and value["fraction"]:
            ctx.cancel()

    ctx = make_ctx(cancel_on_progress)
    with pytest.raises(Cancelled):
        asr.transcribe(ctx, pcm, sample_rate=22050)
    # The decoder went back to the pool in a usable state.
    assert heard_digits(asr.transcribe(make_ctx(), said["audio"], sample_rate=22050)["text"])


@pytest.mark.parametrize("arguments, message", [
    ({}, "audio is required"),
    ({"audio": b"not audio at all"}, "audio is not a WAV or FLAC file (it starts with b'not "
                                     "audi'); send a file's bytes, or raw 16-bit"),
    ({"audio": b""}, "audio is not a WAV or FLAC file"),
    ({"audio": b"", "sample_rate": 16000}, "the audio is empty (0 samples)"),
    ({"audio": "speech.wav"}, "audio must be the bytes of a WAV/FLAC file, raw 16-bit PCM bytes "
                              "with sample_rate, or a numpy array with sample_rate; not str"),
    ({"audio": 42}, "not int"),
    ({"audio": [0.1, 0.2]}, "not list"),
    ({"audio": b"RIFF\x10\x00\x00\x00WAVEjunkjunk"}, "cannot decode the WAV file"),
    ({"audio": b"fLaC\x00\x00\x00\x22" + b"\x00" * 30}, "cannot decode the FLAC file"),
    ({"audio": b"\x00\x01\x02", "sample_rate": 16000}, "even number of bytes; got 3"),
    ({"audio": b"\0\0", "sample_rate": 0}, "sample_rate 0 is out of range: 4000 .. 384000 Hz"),
    ({"audio": b"\0\0", "sample_rate": -16000}, "out of range"),
    ({"audio": b"\0\0", "sample_rate": 10 ** 9}, "out of range"),
    ({"audio": b"\0\0", "sample_rate": 16000.5}, "sample_rate must be a whole number"),
    ({"audio": b"\0\0", "sample_rate": "16000"}, "sample_rate must be a number"),
    ({"audio": b"\0\0", "sample_rate": True}, "sample_rate must be a number"),
    ({"audio": numpy.zeros(100, numpy.float32)}, "an array of samples needs sample_rate"),
    ({"audio": numpy.zeros((2, 2, 2), numpy.float32), "sample_rate": 16000},
     "must have shape (samples,) or (samples, channels), not (2, 2, 2)"),
    ({"audio": numpy.zeros((2, 1000), numpy.float32), "sample_rate": 16000},
     "would have 1000 channels"),
    ({"audio": numpy.zeros(100, numpy.uint8), "sample_rate": 16000},
     "dtype uint8 are not supported"),
    ({"audio": numpy.zeros(100, numpy.complex64), "sample_rate": 16000}, "not supported"),
    ({"audio": numpy.full(100, numpy.nan, numpy.float32), "sample_rate": 16000},
     "NaN or infinite"),
    ({"audio": numpy.full(100, 300.0, numpy.float32), "sample_rate": 16000},
     "float samples must lie in [-1, 1], but the peak is 300"),
    ({"audio": numpy.zeros(0, numpy.int16), "sample_rate": 16000}, "the audio is empty"),
    ({"audio": b"\0\0" * 100, "sample_rate": 16000, "language": "de"},
     "language 'de' is not one this model speaks; valid: en"),
    ({"audio": b"\0\0" * 100, "sample_rate": 16000, "language": 3},
     "language must be a language code"),
])
def test_bad_input_is_bad_arguments_with_a_clear_message(asr, arguments, message):
    with pytest.raises(BadArguments) as info:
        asr.transcribe(make_ctx(), **arguments)
    assert message in info.value.message
    assert info.value.message.startswith("transcribe: ")


def test_a_file_whose_rate_differs_from_sample_rate(asr):
    with pytest.raises(BadArguments, match="wrong rate: the WAV file is at 22050 Hz but "
                                           "sample_rate says 16000"):
        asr.transcribe(make_ctx(), wav_bytes(b"\0\0" * 100, 22050), sample_rate=16000)
    assert asr.transcribe(make_ctx(), wav_bytes(b"\0\0" * 100, 22050),
                          sample_rate=22050)["text"] == ""
    empty = wav_bytes(b"", 16000)
    with pytest.raises(BadArguments, match="the audio is empty"):
        asr.transcribe(make_ctx(), empty)


@pytest.mark.parametrize("chunk_s", [0, 0.01, 31, "fast", True, None])
def test_transcribe_stream_checks_chunk_s_before_it_streams(asr, chunk_s):
    with pytest.raises(BadArguments, match="chunk_s must be a number of seconds from 0.05 to 30"):
        asr.transcribe_stream(make_ctx(), b"\0\0" * 100, sample_rate=16000, chunk_s=chunk_s)


def test_audio_longer_than_max_audio_s():
    engine = PocketsphinxEngine(max_audio_s=1)
    engine.load()
    try:
        with pytest.raises(BadArguments, match=r"the audio is 2\.0 s long, more than the 1 s "
                                               r"allowed \(max_audio_s\)"):
            engine.transcribe(make_ctx(), numpy.zeros(32000, numpy.int16), sample_rate=16000)
        session = engine.stream_start(make_ctx(), 16000)
        engine.stream_feed(make_ctx(), session, numpy.zeros(12000, numpy.int16))
        with pytest.raises(BadArguments, match="more than 1 s of audio"):
            engine.stream_feed(make_ctx(), session, numpy.zeros(8000, numpy.int16))
        assert engine.stream_end(make_ctx(), session)["duration_s"] == 0.75
    finally:
        engine.unload()


def test_sessions_are_bounded_in_count_and_idle_time():
    engine = PocketsphinxEngine(max_sessions=2, session_idle_s=30)
    clock = engine._clock = FakeClock()
    engine.load()
    try:
        first = engine.stream_start(make_ctx(), 16000)
        second = engine.stream_start(make_ctx(), 16000)
        with pytest.raises(BadArguments, match="2 streaming sessions are open, the most this "
                                               "daemon keeps .max_sessions.; end one with "
                                               "stream_end, or wait: a session idle for 30 s"):
            engine.stream_start(make_ctx(), 16000)
        clock.now += 20
        engine.stream_feed(make_ctx(), second, b"\0\0" * 160)  # keeps `second` alive
        clock.now += 15
        third = engine.stream_start(make_ctx(), 16000)  # `first` expired: room again
        with pytest.raises(BadArguments) as info:
            engine.stream_feed(make_ctx(), first, b"\0\0" * 160)
        assert info.value.message == (
            "stream_feed: session {!r} expired after 30 s without a call (session_idle_s); "
            "start a new one with stream_start".format(first))
        with pytest.raises(BadArguments, match="expired after 30 s"):
            engine.stream_end(make_ctx(), first)
        assert engine.stream_end(make_ctx(), second)["text"] == ""
        with pytest.raises(BadArguments, match="session '{}' has ended .stream_end.; start a "
                                               "new one".format(second)):
            engine.stream_feed(make_ctx(), second, b"\0\0")
        with pytest.raises(BadArguments, match="no streaming session 'nope' here"):
            engine.stream_feed(make_ctx(), "nope", b"\0\0")
        for bad in (None, 7, ""):
            with pytest.raises(BadArguments, match="session must be the id stream_start "
                                                   "returned"):
                engine.stream_end(make_ctx(), bad)
        assert engine.describe()["sessions"] == 1
        engine.unload()
        engine.load()
        with pytest.raises(BadArguments, match="was closed when the daemon unloaded its model"):
            engine.stream_feed(make_ctx(), third, b"\0\0")
        assert engine.describe()["sessions"] == 0
    finally:
        engine.unload()


@pytest.mark.parametrize("arguments, message", [
    ({}, "sample_rate is required"),
    ({"sample_rate": 100}, "sample_rate 100 is out of range"),
    ({"sample_rate": 16000, "language": "fr"}, "language 'fr' is not one this model speaks"),
])
def test_stream_start_checks_its_arguments(asr, arguments, message):
    with pytest.raises(BadArguments, match=message):
        asr.stream_start(make_ctx(), **arguments)


def test_decoders_are_pooled_and_calls_run_side_by_side(speech):
    engine = PocketsphinxEngine(max_sessions=4)
    engine.load()
    said = speech()
    try:
        sessions = [engine.stream_start(make_ctx(), 22050) for _ in range(3)]
        results, errors = {}, []

        def transcribe():
            try:
                results["whole"] = engine.transcribe(make_ctx(), said["audio"],
                                                     sample_rate=22050)
            except Exception as exc:  # reported below
                errors.append(exc)

        worker = threading.Thread(target=transcribe)
        worker.start()
        step = 8820
        for start in range(0, len(said["audio"]), step):
            for session in sessions:
                engine.stream_feed(make_ctx(), session, said["audio"][start:start + step])
        finals = [engine.stream_end(make_ctx(), session) for session in sessions]
        worker.join()
        assert not errors
        assert all(final == results["whole"] for final in finals)
        assert heard_digits(results["whole"]["text"])
        assert engine.describe()["idle_decoders"] == ps_engine.IDLE_DECODERS
    finally:
        engine.unload()
    assert engine.describe()["idle_decoders"] == 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown option 'colour'; the options are: dictionary, "
                                         "hmm, language"):
        PocketsphinxEngine(colour="red")
    with pytest.raises(ValueError, match="'vad_mode' must be an integer from 0 to 3, not 7"):
        PocketsphinxEngine(vad_mode=7)
    with pytest.raises(ValueError, match="'max_sessions' must be an integer from 1 to 256"):
        PocketsphinxEngine(max_sessions=0)
    with pytest.raises(ValueError, match="'session_idle_s' must be a number over 0"):
        PocketsphinxEngine(session_idle_s="long")
    with pytest.raises(ValueError, match="'language' must be a language code"):
        PocketsphinxEngine(language="english please")


def test_preflight_names_missing_model_files(tmp_path):
    hmm = tmp_path / "hmm"
    hmm.mkdir()
    (hmm / "mdef").write_text("x")
    problems = PocketsphinxEngine.preflight({"hmm": str(hmm), "lm": str(tmp_path / "x.lm.bin"),
                                             "dictionary": str(tmp_path / "x.dict")})
    assert problems == [
        "pocketsphinx: {} is not an acoustic model directory: means, variances, "
        "transition_matrices missing".format(hmm),
        "pocketsphinx: language model (a .lm.bin or ARPA file) (option lm) not found at "
        "{}".format(tmp_path / "x.lm.bin"),
        "pocketsphinx: pronunciation dictionary (.dict) (option dictionary) not found at "
        "{}".format(tmp_path / "x.dict"),
    ]
    assert PocketsphinxEngine.preflight({"hmm": str(tmp_path / "none")}) == [
        "pocketsphinx: acoustic model directory (option hmm) not found at {}: expected a "
        "directory with mdef, means, variances, transition_matrices".format(tmp_path / "none")]
    assert PocketsphinxEngine.preflight({"vad_mode": "x"}) == [
        "pocketsphinx: option 'vad_mode' must be an integer from 0 to 3, not 'x'"]
    engine = PocketsphinxEngine(hmm=str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="pocketsphinx: cannot load: .*option hmm. not found"):
        engine.load()


def test_a_custom_model_from_paths_loads(tmp_path):
    model = ps_engine._bundled_model()
    engine = PocketsphinxEngine(hmm=os.path.join(model, "en-us"),
                                lm=os.path.join(model, "en-us.lm.bin"),
                                dictionary=os.path.join(model, "cmudict-en-us.dict"),
                                language="en-US")
    assert PocketsphinxEngine.preflight(engine.options) == []
    engine.load()
    try:
        assert engine.describe()["language"] == "en-us"
        result = engine.transcribe(make_ctx(), numpy.zeros(1600, numpy.int16), sample_rate=16000,
                                   language="en")
        assert result["language"] == "en-us"
    finally:
        engine.unload()


# --- the resampler ---------------------------------------------------------------------


@pytest.mark.parametrize("source", [8000, 11025, 22050, 44100, 48000])
def test_the_numpy_resampler_matches_soxr_and_streams_exactly(source):
    import soxr

    t = numpy.arange(2 * source) / float(source)
    signal = (0.5 * numpy.sin(2 * numpy.pi * 440 * t)).astype(numpy.float32)
    ours = asr_audio.resample(signal, source, 16000, prefer_soxr=False)
    theirs = soxr.resample(signal, source, 16000)
    assert len(ours) == len(theirs) == 32000
    inner = slice(200, -200)
    assert numpy.abs(ours[inner] - theirs[inner]).max() < 1e-3
    stream = asr_audio.NumpyResampler(source, 16000)
    rng = numpy.random.default_rng(source)
    pieces, start = [], 0
    while start < len(signal):
        size = int(rng.integers(1, 3000))
        pieces.append(stream.feed(signal[start:start + size]))
        start += size
    pieces.append(stream.finish())
    assert numpy.array_equal(numpy.concatenate(pieces), ours)


def test_the_numpy_resampler_removes_what_the_target_rate_cannot_hold():
    t = numpy.arange(44100) / 44100.0
    above = (0.5 * numpy.sin(2 * numpy.pi * 9000 * t)).astype(numpy.float32)  # > 8 kHz
    out = asr_audio.resample(above, 44100, 16000, prefer_soxr=False)
    assert numpy.sqrt((out[200:-200] ** 2).mean()) < 0.01  # was 0.35 rms: aliased otherwise


# --- faster-whisper, against the stand-in ---------------------------------------------


def whisper_dir(path, multilingual=True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(b"\x01" * 2048)
    (path / "config.json").write_text(json.dumps({"multilingual": multilingual}))
    (path / "tokenizer.json").write_text("{}")
    (path / "vocabulary.json").write_text("[]")
    return path


def tone_words(pitches, rate=16000, word_s=0.3, gap_s=0.2, pause_every=None):
    """int16 PCM: a tone burst per pitch; the stand-in hears 100 Hz as 'one', 200 as 'two'."""
    pieces = []
    for index, pitch in enumerate(pitches):
        t = numpy.arange(int(word_s * rate)) / float(rate)
        pieces.append(0.5 * numpy.sin(2 * numpy.pi * pitch * t))
        gap = 1.5 if pause_every and (index + 1) % pause_every == 0 else gap_s
        pieces.append(numpy.zeros(int(gap * rate)))
    return (numpy.concatenate(pieces) * 32767).astype("<i2")


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_whisper", whisper_standin)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    whisper_standin.reset()
    yield whisper_standin
    whisper_standin.reset()


def test_whisper_preflight_says_exactly_what_is_missing(tmp_path):
    assert FasterWhisperEngine.preflight({}) == [
        "faster-whisper: option 'model_dir' is not set: it must name " +
        whisper_engine.WHAT_MODEL_DIR_HOLDS]
    missing = tmp_path / "nowhere"
    problems = FasterWhisperEngine.preflight({"model_dir": str(missing)})
    # faster-whisper and CTranslate2 are not installed on the host: said, with the fix.
    assert problems[:2] == [
        "faster-whisper: {} is not installed in {} ({}); install it with `pip install -r "
        "{}`".format(module, sys.prefix, sys.executable, whisper_engine.REQUIREMENTS)
        for module in ("faster_whisper", "ctranslate2")]
    assert problems[2:] == ["faster-whisper: model_dir {} not found: expected {}".format(
        missing, whisper_engine.WHAT_MODEL_DIR_HOLDS)]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.bin").write_text("version https://git-lfs.github.com/spec/v1\noid x\n")
    (partial / "config.json").write_text("{}")
    assert whisper_engine.model_dir_problems(str(partial)) == [
        "faster-whisper: {} is a Git LFS pointer, not the CTranslate2 weights: run `git lfs "
        "pull` in {}".format(partial / "model.bin", partial),
        "faster-whisper: {} not found: the tokenizer (without it faster-whisper fetches one "
        "from the Hugging Face Hub, which this daemon never does) belongs there; {} is not a "
        "complete {}".format(partial / "tokenizer.json", partial,
                             whisper_engine.WHAT_MODEL_DIR_HOLDS),
        "faster-whisper: neither vocabulary.json nor vocabulary.txt is in {}: CTranslate2 "
        "needs the model's vocabulary".format(partial),
    ]
    assert whisper_engine.model_dir_problems(str(whisper_dir(tmp_path / "ok"))) == []


@pytest.mark.parametrize("options, message", [
    ({"model_dir": 3}, "option 'model_dir' must be a path, not 3"),
    ({"model_dir": "/m", "device": "tpu"}, "option 'device' must be one of cpu, cuda, auto"),
    ({"model_dir": "/m", "compute_type": "Float 16"}, "option 'compute_type' must be a "
                                                      "CTranslate2 compute type"),
    ({"model_dir": "/m", "language": "English"}, "option 'language' must be a Whisper "
                                                 "language code"),
    ({"model_dir": "/m", "beam_size": 0}, "option 'beam_size' must be an integer from 1 to 32"),
    ({"model_dir": "/m", "word_timestamps": "yes"}, "'word_timestamps' must be true or false"),
    ({"model_dir": "/m", "partial_every_s": -1}, "'partial_every_s' must be a number over 0"),
    ({"model_dir": "/m", "hmm": "/x"}, "unknown option 'hmm'; the options are: beam_size, "
                                       "compute_type, cpu_threads"),
])
def test_whisper_options_are_checked(options, message):
    assert any(message in line for line in FasterWhisperEngine.preflight(options))
    with pytest.raises(ValueError, match=message.replace("(", ".").replace(")", ".")):
        FasterWhisperEngine(**options)


def test_whisper_loads_local_weights_only_and_never_downloads(tmp_path, standin):
    model_dir = whisper_dir(tmp_path / "small")
    engine = FasterWhisperEngine(model_dir=str(model_dir), compute_type="int8", cpu_threads=2)
    engine.load()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert standin.calls == [("init", str(model_dir), dict(
        device="cpu", device_index=0, compute_type="int8", cpu_threads=2, num_workers=1,
        download_root=None, local_files_only=True, files=None, revision=None,
        use_auth_token=None))]
    assert engine.describe()["model"] == str(model_dir)
    engine.unload()
    assert engine.model is None
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(RuntimeError, match="faster-whisper: cannot load: .*tokenizer.json not "
                                           "found"):
        engine.load()
    assert len(standin.calls) == 1  # refused before faster-whisper was asked


def test_whisper_transcribes_through_the_engine(tmp_path, standin):
    engine = FasterWhisperEngine(model_dir=str(whisper_dir(tmp_path / "m")))
    engine.load()
    pcm = tone_words([300, 400, 500, 200], rate=22050, pause_every=2)
    sent = Sent()
    result = engine.transcribe(make_ctx(sent), wav_bytes(pcm.tobytes(), 22050))
    assert result["text"] == "three four five two"
    assert result["language"] == "en"
    assert [s["text"] for s in result["segments"]] == ["three four", "five two"]
    assert words_of(result) == ["three", "four", "five", "two"]
    assert result["words"][0]["start"] == pytest.approx(0.0, abs=0.03)
    assert result["words"][2]["start"] == pytest.approx(0.3 + 0.2 + 0.3 + 1.5, abs=0.05)
    assert result["duration_s"] == pytest.approx(len(pcm) / 22050.0, abs=0.001)
    fractions = sent.fractions()
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) == 4
    kind, samples, options = standin.calls[-1]
    assert kind == "transcribe" and samples == int(round(len(pcm) * 16000 / 22050.0))
    assert options == dict(language=None, task="transcribe", beam_size=5, word_timestamps=True,
                           vad_filter=False)
    german = engine.transcribe(make_ctx(), pcm, sample_rate=22050, language="de")
    assert german["language"] == "de"
    with pytest.raises(BadArguments, match="language 'xx' is not one this model speaks; valid: "
                                           "de, en, es"):
        engine.transcribe(make_ctx(), pcm, sample_rate=22050, language="xx")
    with pytest.raises(BadArguments, match="the audio is empty"):
        engine.transcribe(make_ctx(), b"", sample_rate=16000)


def test_whisper_streams_a_partial_per_segment(tmp_path, standin):
    engine = FasterWhisperEngine(model_dir=str(whisper_dir(tmp_path / "m")),
                                 word_timestamps=False)
    engine.load()
    pcm = tone_words([100, 200, 300, 400, 500, 600], pause_every=2)
    chunks, result = drain(engine.transcribe_stream(make_ctx(), pcm, sample_rate=16000))
    assert chunks == [{"partial": "one two"}, {"partial": "one two three four"},
                      {"partial": "one two three four five six"}]
    assert result["text"] == "one two three four five six" and result["words"] == []
    assert standin.segments_yielded[0] == 3


def test_whisper_sessions_decode_again_every_partial_every_s(tmp_path, standin):
    engine = FasterWhisperEngine(model_dir=str(whisper_dir(tmp_path / "m", multilingual=False)),
                                 partial_every_s=1.0, language="en")
    engine.load()
    with pytest.raises(BadArguments, match="language 'de' is not one this model speaks; "
                                           "valid: en"):
        engine.stream_start(make_ctx(), 16000, language="de")
    pcm = tone_words([700, 800, 900], pause_every=1)  # a segment per word
    session = engine.stream_start(make_ctx(), 16000)
    partials = []
    step = 8000  # 0.5 s
    for start in range(0, len(pcm), step):
        partials.append(engine.stream_feed(make_ctx(), session, pcm[start:start + step]))
    decodes = sum(1 for call in standin.calls if call[0] == "transcribe")
    assert decodes == len(pcm) // 16000  # once per second of audio, not per feed
    assert partials[-1]["partial"].startswith("seven eight")
    final = engine.stream_end(make_ctx(), session)
    assert final["text"] == "seven eight nine" and final["language"] == "en"
    assert [w["word"] for w in final["words"]] == ["seven", "eight", "nine"]


def test_whisper_refuses_a_configured_language_the_model_lacks(tmp_path, standin):
    engine = FasterWhisperEngine(model_dir=str(whisper_dir(tmp_path / "m", multilingual=False)),
                                 language="de")
    with pytest.raises(RuntimeError, match="option language 'de' is not one this model speaks; "
                                           "valid: en"):
        engine.load()
    assert not engine.loaded


# --- faster-whisper itself, on a tiny model of random weights -----------------------------

TINY_WHISPER = ROOT / "tests" / "data" / "tiny-whisper"  # made by tests/data/make_tiny_whisper.py

REAL_WHISPER_SCRIPT = r'''
import json, os, sys
import numpy
from modelhost.daemons.asr.whisper_engine import FasterWhisperEngine
from modelhost.daemons.engine import CallContext
from modelhost.errors import BadArguments

model_dir = sys.argv[1]
assert FasterWhisperEngine.preflight({"model_dir": model_dir}) == []
sent = []
ctx = CallContext(1, "t", False, lambda kind, value: sent.append((kind, value)))
engine = FasterWhisperEngine(model_dir=model_dir, cpu_threads=1, beam_size=1)
engine.load()
assert os.environ["HF_HUB_OFFLINE"] == "1"
facts = engine.describe()
assert facts["version"] == "1.2.1" and facts["engine"] == "faster-whisper", facts
rate = 22050
tone = (0.3 * numpy.sin(2 * numpy.pi * 220 * numpy.arange(3 * rate) / rate)).astype(numpy.float32)
result = engine.transcribe(ctx, tone, sample_rate=rate)
assert set(result) == {"text", "language", "duration_s", "segments", "words"}, result
assert result["duration_s"] == 3.0 and result["language"] == "en"
assert isinstance(result["text"], str) and result["segments"], result
for item in result["segments"] + result["words"]:
    assert 0.0 <= item["start"] <= item["end"] <= 3.0, item
fractions = [value["fraction"] for kind, value in sent if kind == "progress"]
assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
chunks = []
stream = engine.transcribe_stream(ctx, tone, sample_rate=rate)
while True:
    try:
        chunks.append(next(stream))
    except StopIteration as stop:
        streamed = stop.value
        break
assert chunks and all(set(chunk) == {"partial"} for chunk in chunks) and streamed["segments"]
session = engine.stream_start(ctx, rate)
for start in range(0, len(tone), rate // 2):
    fed = engine.stream_feed(ctx, session, tone[start:start + rate // 2])
assert fed["duration_s"] == 3.0
final = engine.stream_end(ctx, session)
assert final["duration_s"] == 3.0 and final["segments"]
try:
    engine.transcribe(ctx, tone, sample_rate=rate, language="de")  # the tiny model is "en" only
    raise SystemExit("an unknown language was taken")
except BadArguments as exc:
    assert "valid: en" in exc.message
engine.unload()
print("ok")
'''


@pytest.fixture(scope="module")
def whisper_venv():
    """A venv of requirements-whisper.txt (faster-whisper 1.2.1, CTranslate2) on 3.12,
    built by modelhost's own setup code and kept in .cache/test-venvs."""
    from modelhost.broker import envs
    from modelhost.broker.config import DaemonConfig

    from conftest import VENV_CACHE

    daemon = DaemonConfig(name="whisper", engine="modelhost.daemons.asr.whisper_engine:"
                                                 "FasterWhisperEngine", python="3.12",
                          venv=VENV_CACHE / "whisper",
                          requirements=ROOT / "daemons" / "asr" / "requirements-whisper.txt",
                          options={"model_dir": str(TINY_WHISPER)})
    result = envs.setup_daemon(daemon, log=lambda line: None)
    assert result.action in ("created", "updated", "unchanged"), result.message
    assert result.cannot == []  # its preflight, in its own venv: nothing missing
    return VENV_CACHE / "whisper"


@pytest.mark.slow
def test_faster_whisper_itself_runs_a_tiny_model_through_the_engine(whisper_venv):
    """The real faster-whisper and CTranslate2 load tests/data/tiny-whisper (random weights:
    the text is noise) and run every operation; a download would fail (no endpoint)."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=os.devnull)
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run([str(whisper_venv / "bin" / "python"), "-c", REAL_WHISPER_SCRIPT,
                          str(TINY_WHISPER)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "ok"


# --- Python 3.7: the modules the daemon imports ------------------------------------------

PY37_SCRIPT = r'''
import io, sys, wave
import numpy
from modelhost.daemons.asr import audio, base, pocketsphinx_engine, whisper_engine
from modelhost.daemons.engine import CallContext
from modelhost.errors import BadArguments

assert audio.soxr is None and audio.soundfile is None, "expected neither on the 3.7 venv"
out = io.BytesIO()
with wave.open(out, "wb") as wav:
    wav.setnchannels(2); wav.setsampwidth(2); wav.setframerate(22050)
    wav.writeframes(numpy.zeros((2205, 2), "<i2").tobytes())
samples, rate = audio.decode(out.getvalue(), None, "t")
assert rate == 22050 and samples.shape == (2205,) and samples.dtype == numpy.float32
assert len(audio.resample(samples, rate)) == 1600
try:
    audio.decode(b"junk", None, "t")
    raise SystemExit("junk was taken for audio")
except BadArguments as exc:
    assert "not a WAV or FLAC file" in exc.message

class Echo(object):
    """A recognizer that hears the number of samples."""
    def __init__(self): self.n = 0
    def feed(self, ctx, samples): self.n += len(samples)
    def partial(self, ctx): return str(self.n)
    def finish(self, ctx): return {"text": str(self.n), "language": "xx", "segments": [],
                                   "words": []}
    def close(self): pass

class EchoEngine(base.AsrEngine):
    def _load(self): return {None: "xx", "xx": "xx"}
    def _unload(self): pass
    def _recognizer(self, language, live): return Echo()

engine = EchoEngine()
engine.load()
ctx = CallContext(1, "t", False, lambda kind, value: None)
assert engine.transcribe(ctx, b"\0\0" * 8000, sample_rate=8000)["text"] == "16000"
generator = engine.transcribe_stream(ctx, numpy.zeros(16000, numpy.float32), sample_rate=16000,
                                     chunk_s=0.25)
partials = []
while True:
    try:
        partials.append(next(generator)["partial"])
    except StopIteration as stop:
        final = stop.value
        break
assert partials == ["4000", "8000", "12000", "16000"] and final["duration_s"] == 1.0
session = engine.stream_start(ctx, 8000)
engine.stream_feed(ctx, session, b"\0\0" * 4000)
assert engine.stream_end(ctx, session)["text"] == "8000"
lines = pocketsphinx_engine.PocketsphinxEngine.preflight({})
assert lines and "pocketsphinx is not installed" in lines[0], lines
lines = whisper_engine.FasterWhisperEngine.preflight({"model_dir": "/nowhere"})
assert "faster_whisper is not installed" in lines[0], lines
print("ok", sys.version_info[:2])
'''


@pytest.mark.slow
def test_the_modules_the_daemon_imports_run_on_python_37(test_venvs):
    python = str(test_venvs["py37"] / "bin" / "python")
    run = subprocess.run([python, "-c", PY37_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok (3, 7)"


# --- end to end: a real `modelhost up` with the daemons in their own venvs --------------


def real_daemon(name, engine, requirements, **settings):
    """A daemon section like the embedded default's, in the venv the default's tests use."""
    lines = ["  {}:".format(name), "    engine: {}".format(engine), '    python: "3.12"',
             "    venv: {}".format(TEST_STATE / "venvs" / name),
             "    requirements: {}".format(ROOT / requirements)]
    lines += ["    {}: {}".format(key, value) for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def speech_host():
    host = Host([
        real_daemon("espeak", "modelhost.daemons.espeak.engine:EspeakEngine",
                    "daemons/espeak/requirements.txt", options="{voice: en-us}"),
        real_daemon("asr", "modelhost.daemons.asr.pocketsphinx_engine:PocketsphinxEngine",
                    "daemons/asr/requirements-pocketsphinx.txt", concurrency=2,
                    options="{max_sessions: 2, session_idle_s: 30}"),
    ])
    try:
        host.start(setup=True)  # builds the venvs when they are missing or out of date
        host.wait_ready("espeak", "asr", timeout=600)
        yield host
    finally:
        host.stop()


@pytest.mark.slow
def test_speech_from_the_tts_daemon_comes_back_as_text(speech_host, tmp_path):
    client = speech_host.client(timeout=120)
    status = speech_host.daemon("asr")
    assert status["python"].startswith("3.12.")
    assert not sys.version.startswith("3.12.")  # another interpreter than the broker's
    said = client.call("espeak", "tts", text=DIGITS, rate=150)
    assert said["sample_rate"] == 22050
    wav = wav_bytes(said["audio"], said["sample_rate"])
    result = client.transcribe(wav)  # the helper: model "asr"
    assert heard_digits(result["text"]), result
    assert words_of(result)[:4] == HEARD
    # The TTS result passed on as it is: raw PCM and its rate.
    direct = client.call("asr", "transcribe", audio=said["audio"], sample_rate=22050)
    assert direct == result
    path = tmp_path / "digits.wav"
    path.write_bytes(wav)
    assert client.transcribe(str(path)) == result
    assert client.transcribe(modelhost.Audio(samples_of(said), 22050, {})) == result
    progress = []
    client.transcribe(wav, on_progress=progress.append)
    assert progress and progress[-1].fraction == 1.0

    cli = subprocess.run([sys.executable, "-m", "modelhost.cli", "transcribe", str(path),
                          "--endpoint", speech_host.endpoint, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == result
    plain = subprocess.run([sys.executable, "-m", "modelhost.cli", "transcribe", str(path),
                            "--endpoint", speech_host.endpoint],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and plain.stdout.strip() == result["text"]
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio")
    bad = subprocess.run([sys.executable, "-m", "modelhost.cli", "transcribe", str(garbage),
                          "--endpoint", speech_host.endpoint],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "bad_arguments" in bad.stderr
    assert "not a WAV or FLAC file" in bad.stderr


@pytest.mark.slow
def test_streaming_through_the_broker(speech_host):
    client = speech_host.client(timeout=120)
    said = client.call("espeak", "tts", text=DIGITS, rate=150)
    whole = client.transcribe(said["audio"], sample_rate=22050)

    stream = client.stream("asr", "transcribe_stream", audio=said["audio"], sample_rate=22050,
                           chunk_s=0.25)
    partials = [chunk["partial"] for chunk in stream]
    assert len(partials) >= 3 and all(partials)
    assert stream.result == whole

    session = client.call("asr", "stream_start", sample_rate=22050)
    step = 8820
    fed = [client.call("asr", "stream_feed", session=session, audio=said["audio"][i:i + step])
           for i in range(0, len(said["audio"]), step)]
    assert any(f["partial"] for f in fed)
    assert client.call("asr", "stream_end", session=session) == whole
    with pytest.raises(modelhost.BadArguments, match="has ended .stream_end."):
        client.call("asr", "stream_feed", session=session, audio=b"\0\0")

    sessions = [client.call("asr", "stream_start", sample_rate=16000) for _ in range(2)]
    with pytest.raises(modelhost.BadArguments, match="2 streaming sessions are open"):
        client.call("asr", "stream_start", sample_rate=16000)
    for session in sessions:
        assert client.call("asr", "stream_end", session=session)["text"] == ""


@pytest.mark.slow
def test_bad_input_through_the_broker(speech_host):
    client = speech_host.client(timeout=60)
    for arguments, message in [
            ({"audio": b"garbage, not audio"}, "not a WAV or FLAC file"),
            ({"audio": b"", "sample_rate": 16000}, "the audio is empty"),
            ({"audio": b"\0\0", "sample_rate": 1}, "out of range"),
            ({"audio": numpy.zeros(10, numpy.uint8), "sample_rate": 16000}, "not supported"),
            ({"audio": b"\0\0", "sample_rate": 16000, "language": "de"},
             "language 'de' is not one"),
            ({"audio": b"\0\0", "rate": 16000}, "accepted arguments: audio, sample_rate, "
                                                "language")]:
        with pytest.raises(modelhost.BadArguments, match=message):
            client.call("asr", "transcribe", **arguments)
    # The daemon kept serving, warm.
    assert client.call("asr", "transcribe", audio=b"\0\0" * 1600,
                       sample_rate=16000)["text"] == ""
    assert speech_host.daemon("asr")["loads"] == 1
