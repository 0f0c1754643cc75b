"""The espeak-ng engine in-process: real libespeak-ng from the espeakng-loader wheel."""

import array
import math
import os
import re
import threading
import time

import pytest

import espeakng_loader  # noqa: E402,F401 (installed by tests/run: a missing one must fail, not skip)

from modelhost.daemons.engine import CallContext, operations_of  # noqa: E402
from modelhost.daemons.espeak.engine import EspeakEngine  # noqa: E402
from modelhost.errors import BadArguments, Cancelled  # noqa: E402
from conftest import drain  # noqa: E402

LONG_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs far away "
             "into the forest, where nobody can find it again. ") * 20


def make_ctx(stream=False, send=None):
    return CallContext(request_id=1, method="tts", stream=stream,
                       send=send or (lambda kind, value: None))


def samples_of(audio):
    values = array.array("h")
    values.frombytes(audio)
    return values


def rms(values):
    return math.sqrt(sum(v * v for v in values) / float(len(values))) if values else 0.0


@pytest.fixture(scope="module")
def engine():
    engine = EspeakEngine()
    engine.load()
    yield engine
    engine.unload()


def test_operations_and_describe(engine):
    assert set(operations_of(engine)) == {"tts", "voices"}
    facts = engine.describe()
    assert facts["engine"] == "espeak-ng"
    assert facts["sample_rate"] == engine.sample_rate > 0
    assert facts["library"].endswith(("libespeak-ng.so", ".dylib", ".dll"))
    assert facts["voices"] > 10
    voices = engine.voices(make_ctx())
    assert "en" in voices and "en-us" in voices
    assert len(voices) == facts["voices"]


def test_tts_hello_world(engine):
    result = engine.tts(make_ctx(), "hello world")
    assert set(result) == {"audio", "sample_rate", "format", "channels", "samples"}
    assert result["format"] == "s16le" and result["channels"] == 1
    assert result["sample_rate"] == engine.sample_rate
    assert isinstance(result["audio"], bytes)
    assert len(result["audio"]) == 2 * result["samples"]
    values = samples_of(result["audio"])
    assert len(values) / float(result["sample_rate"]) > 0.3
    assert rms(values) > 300  # speech, not silence


def test_second_call_does_not_reload(engine):
    loads = engine.loads
    first = engine.tts(make_ctx(), "one")
    second = engine.tts(make_ctx(), "two", voice="en-us", rate=220, pitch=70)
    assert first["samples"] > 0 and second["samples"] > 0
    assert engine.loads == loads == 1


def test_progress_reported(engine):
    sent = []
    engine.tts(make_ctx(send=lambda kind, value: sent.append((kind, value))), LONG_TEXT[:400])
    fractions = [value["fraction"] for kind, value in sent if kind == "progress"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(fractions) > 3
    assert fractions == sorted(fractions)


def test_rate_changes_duration(engine):
    slow = engine.tts(make_ctx(), "this sentence is spoken at two speeds", rate=100)
    fast = engine.tts(make_ctx(), "this sentence is spoken at two speeds", rate=400)
    assert slow["samples"] > 1.5 * fast["samples"]


def test_voice_spellings(engine):
    for voice in ("en", "EN-us", "English (America)", "de", "en+f3"):
        assert engine.tts(make_ctx(), "hallo", voice=voice)["samples"] > 0


def test_every_listed_voice_speaks(engine):
    # espeak_SetVoiceByName takes voice files, not language codes: "en-gb" is a
    # language of the file gmw/en and failed with EE_NOT_FOUND although listed.
    voices = engine.voices(make_ctx())
    assert {"en-gb", "en", "en-us", "no", "zh", "es-mx", "pt-pt"} <= set(voices)
    for voice in voices:
        result = engine.tts(make_ctx(), "hello world, one two three", voice=voice)
        assert rms(samples_of(result["audio"])) > 300, voice  # speech, not silence


def test_every_voice_the_readme_suggests_speaks(engine):
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "daemons", "espeak",
                               "README.md")).read()
    bullet = readme[readme.index("- `voice`:"):readme.index("- `rate`:")]
    suggested = [name for name in re.findall(r"`([^`]+)`", bullet)
                 if name not in ("voice", "voices", "bad_arguments")]
    assert "en-gb" in suggested and "English (America)" in suggested
    for voice in suggested:
        result = engine.tts(make_ctx(), "hello", voice=voice)
        assert rms(samples_of(result["audio"])) > 300, voice


def test_unknown_voice_lists_valid_ones_bounded(engine):
    with pytest.raises(BadArguments) as info:
        engine.tts(make_ctx(), "hello", voice="qqqq")
    message = info.value.message
    assert "unknown voice 'qqqq'" in message and "valid voices: af, " in message
    assert "{} in all".format(len(engine.voices(make_ctx()))) in message
    assert len(message) < 600


def test_unknown_voice_names_close_ones(engine):
    with pytest.raises(BadArguments) as info:
        engine.tts(make_ctx(), "hello", voice="en-uss")
    assert "en-us" in info.value.message
    with pytest.raises(BadArguments) as info:
        engine.tts(make_ctx(), "hello", voice="englsh")
    assert "english" in info.value.message
    with pytest.raises(BadArguments) as info:
        engine.tts(make_ctx(), "hello", voice="en+f33")
    assert "f3" in info.value.message


@pytest.mark.parametrize("arguments", [
    {"text": ""},
    {"text": "   "},
    {"text": 42},
    {"text": b"hello"},
    {"text": "x" * 10001},
    {"text": "a\x00b"},
    {"text": "hello", "voice": 3},
    {"text": "hello", "rate": 10},
    {"text": "hello", "rate": "fast"},
    {"text": "hello", "rate": 200.5},
    {"text": "hello", "pitch": 100},
    {"text": "hello", "pitch": True},
])
def test_bad_arguments(engine, arguments):
    with pytest.raises(BadArguments):
        engine.tts(make_ctx(), **arguments)


def test_streaming_chunks(engine):
    text = LONG_TEXT[:300]
    whole = engine.tts(make_ctx(), text)
    stream = engine.tts(make_ctx(stream=True), text)
    assert not isinstance(stream, dict)
    chunks, summary = drain(stream)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert set(chunk) == {"audio", "sample_rate"}
        assert chunk["sample_rate"] == engine.sample_rate
    # ~0.25 s chunks, the last one may be shorter
    for chunk in chunks[:-1]:
        assert 0.2 <= len(chunk["audio"]) / 2.0 / engine.sample_rate <= 0.4
    audio = b"".join(chunk["audio"] for chunk in chunks)
    assert summary == {"sample_rate": engine.sample_rate, "format": "s16le", "channels": 1,
                       "samples": len(audio) // 2, "chunks": len(chunks)}
    # espeak adds a little random jitter, so two syntheses differ by a few samples.
    assert abs(len(audio) - len(whole["audio"])) <= 0.02 * len(whole["audio"])


def test_cancel_mid_synthesis(engine):
    started = time.monotonic()
    full = engine.tts(make_ctx(), LONG_TEXT)
    full_s = time.monotonic() - started

    holder = {}

    def send(kind, value):
        # Cancel as soon as synthesis reports it got past the start.
        if kind == "progress" and value["fraction"] and 0 < value["fraction"] < 1:
            holder["ctx"].cancel()

    ctx = holder["ctx"] = make_ctx(send=send)
    started = time.monotonic()
    with pytest.raises(Cancelled):
        engine.tts(ctx, LONG_TEXT)
    cancelled_s = time.monotonic() - started
    assert cancelled_s < full_s / 2, (cancelled_s, full_s)
    # the engine is still usable, and its output is as long as before
    again = engine.tts(make_ctx(), LONG_TEXT)
    assert abs(again["samples"] - full["samples"]) <= 0.02 * full["samples"]


def test_cancel_before_call(engine):
    ctx = make_ctx()
    ctx.cancel()
    with pytest.raises(Cancelled):
        engine.tts(ctx, "hello")


def test_cancel_streaming(engine):
    ctx = make_ctx(stream=True)
    stream = engine.tts(ctx, LONG_TEXT)
    first = next(stream)
    assert first["audio"]
    ctx.cancel()
    with pytest.raises(Cancelled):
        drain(stream)
    assert engine.tts(make_ctx(), "still alive")["samples"] > 0


def test_abandoned_stream_releases_engine(engine):
    stream = engine.tts(make_ctx(stream=True), LONG_TEXT)
    next(stream)
    stream.close()
    done = []
    worker = threading.Thread(target=lambda: done.append(engine.tts(make_ctx(), "next")))
    worker.start()
    worker.join(10)
    assert done and done[0]["samples"] > 0


def test_concurrent_calls_are_serialized(engine):
    results, errors = [], []

    def call(i):
        try:
            results.append(engine.tts(make_ctx(), "call number {}".format(i)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert len(results) == 6 and all(r["samples"] > 0 for r in results)


def test_unload_then_load(engine):
    engine.unload()
    with pytest.raises(RuntimeError):
        engine.tts(make_ctx(), "hello")
    engine.load()
    assert engine.loads == 2
    assert engine.tts(make_ctx(), "hello again")["samples"] > 0


def test_second_engine_in_process_is_refused(engine):
    other = EspeakEngine()
    with pytest.raises(RuntimeError) as info:
        other.load()
    assert "unload" in str(info.value)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(RuntimeError) as info:
        EspeakEngine(library=str(tmp_path / "nope.so")).load()
    assert "nope.so" in str(info.value)
    with pytest.raises(RuntimeError) as info:
        EspeakEngine(data=str(tmp_path)).load()
    assert str(tmp_path) in str(info.value)


@pytest.fixture
def released(engine):
    """The shared engine unloaded for the test (libespeak-ng is process-global)."""
    engine.unload()
    yield
    engine.load()


def test_data_parent_directory_is_accepted(released):
    import espeakng_loader
    parent = os.path.dirname(espeakng_loader.get_data_path())
    other = EspeakEngine(data=parent)
    other.load()
    try:
        assert other.tts(make_ctx(), "hello")["samples"] > 0
    finally:
        other.unload()


def test_failed_initialize_is_an_error_not_an_exit(released, tmp_path):
    # Without espeakINITIALIZE_DONT_EXIT the library would call exit(1) here.
    import espeakng_loader
    data = espeakng_loader.get_data_path()
    broken = tmp_path / "espeak-ng-data"
    broken.mkdir()
    for name in os.listdir(data):
        if name != "phondata":
            os.symlink(os.path.join(data, name), str(broken / name))
    with pytest.raises(RuntimeError) as info:
        EspeakEngine(data=str(broken)).load()
    assert "cannot initialize" in str(info.value) and str(broken) in str(info.value)
    assert "No such file" in str(info.value)
    # a good engine still loads afterwards
    good = EspeakEngine()
    good.load()
    try:
        assert good.tts(make_ctx(), "fine")["samples"] > 0
    finally:
        good.unload()


def test_a_voice_whose_dictionary_is_missing_is_left_out(released, tmp_path):
    import espeakng_loader
    data = espeakng_loader.get_data_path()
    partial = tmp_path / "espeak-ng-data"
    partial.mkdir()
    for name in os.listdir(data):
        if name != "de_dict":
            os.symlink(os.path.join(data, name), str(partial / name))
    other = EspeakEngine(data=str(partial))
    other.load()
    try:
        voices = other.voices(make_ctx())
        assert "de" not in voices and "en-gb" in voices
        with pytest.raises(BadArguments) as info:
            other.tts(make_ctx(), "hallo", voice="de")
        assert "no de_dict" in info.value.message and "valid voices:" in info.value.message
        assert other.tts(make_ctx(), "hello", voice="en-gb")["samples"] > 0
    finally:
        other.unload()


def test_bad_options():
    with pytest.raises(ValueError):
        EspeakEngine(rate=5)
    with pytest.raises(ValueError):
        EspeakEngine(pitch=200)
