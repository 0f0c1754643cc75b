"""The CosyVoice2 engine in-process, against a stand-in for upstream's CosyVoice2.

Everything but `_build_model()` is the engine's own code (see
tests/standins/cosyvoice.py for what the stand-in mirrors of upstream at
FunAudioLLM/CosyVoice@ace7c47). One test goes through a real `modelhost up`.
"""

import gc
import io
import math
import os
import subprocess
import sys
import threading

import numpy
import pytest
import soundfile

from conftest import ENGINES, daemon_yaml, drain
from modelhost.daemons.cosyvoice import audio
from modelhost.daemons.cosyvoice.engine import (END_OF_PROMPT, UPSTREAM_COMMIT, CosyVoiceEngine,
                                                WARMUP_PROMPT_TEXT)
from modelhost.daemons.engine import CallContext, operations_of
from modelhost.errors import BadArguments, Cancelled
from standins.cosyvoice import (BUILTIN_AMPLITUDE, BUILTIN_SPEAKER, SAMPLE_RATE, SAMPLES_PER_TOKEN,
                                make_layout, prompt_amplitude, segment_audio)

sys.path.insert(0, str(ENGINES))
from cosyvoice_standin_engine import CosyVoiceStandInEngine  # noqa: E402

TEXT = "Hello from the stand-in."  # one segment of 24 characters: 96 tokens


class Recorder(object):
    """A CallContext's send function that keeps what it was given."""

    def __init__(self):
        self.sent = []

    def __call__(self, kind, value):
        self.sent.append((kind, value))

    def progress(self):
        return [value for kind, value in self.sent if kind == "progress"]


def make_ctx(stream=False, send=None):
    return CallContext(request_id=1, method="tts", stream=stream,
                       send=send if send is not None else Recorder())


def wav_bytes(samples, rate, format="WAV", subtype="FLOAT"):
    buffer = io.BytesIO()
    soundfile.write(buffer, numpy.asarray(samples, dtype=numpy.float32), rate, format=format,
                    subtype=subtype)
    return buffer.getvalue()


def tone(seconds, rate, frequency=440.0, amplitude=0.5, channels=1):
    t = numpy.arange(int(round(seconds * rate))) / float(rate)
    mono = amplitude * numpy.sin(2 * math.pi * frequency * t)
    return mono if channels == 1 else numpy.stack([mono] * channels, axis=1)


PROMPT_SECONDS = 2.0
PROMPT = wav_bytes(tone(PROMPT_SECONDS, 16000), 16000)
PROMPT_TEXT = "the words of the prompt"


def dominant_frequency(samples, rate):
    spectrum = numpy.abs(numpy.fft.rfft(samples * numpy.hanning(len(samples))))
    return numpy.argmax(spectrum) * rate / float(len(samples))


@pytest.fixture
def layout(tmp_path):
    return make_layout(tmp_path)


@pytest.fixture
def make_engine(layout):
    engines = []

    def make(load=True, **options):
        checkout, model_dir = layout
        options.setdefault("checkout", checkout)
        options.setdefault("model_dir", model_dir)
        engine = CosyVoiceStandInEngine(**options)
        if load:
            engine.load()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.unload()


@pytest.fixture
def engine(make_engine):
    return make_engine()


def calls_of(engine, name):
    return [arguments for method, arguments in engine.standin.calls if method == name]


# --- operations, describe ------------------------------------------------------------------------


def test_operations_and_describe(engine):
    assert set(operations_of(engine)) == {"tts", "register_voice", "unregister_voice", "voices"}
    facts = engine.describe()
    assert facts["engine"] == "cosyvoice2" and facts["upstream_commit"] == UPSTREAM_COMMIT
    assert facts["sample_rate"] == 24000 and facts["tier"] == "resident"
    assert facts["token_hop_len"] == 25 and facts["loads"] == 1
    assert engine.voices(make_ctx()) == {"registered": [], "builtin": [BUILTIN_SPEAKER]}


def test_options_reach_the_constructor(make_engine):
    engine = make_engine(fp16=True, load_jit=True, trt_concurrent=2)
    assert engine.standin.arguments == {"load_jit": True, "load_trt": False, "load_vllm": False,
                                        "fp16": True, "trt_concurrent": 2}


def test_bad_options_are_refused(layout):
    checkout, model_dir = layout
    with pytest.raises(ValueError, match="'fp16' must be true or false"):
        CosyVoiceEngine(checkout=checkout, model_dir=model_dir, fp16="yes")
    with pytest.raises(TypeError):
        CosyVoiceEngine(checkout=checkout, model_dir=model_dir, fp_16=True)
    assert CosyVoiceEngine.preflight({"checkout": checkout, "model_dir": model_dir,
                                      "fp_16": True})[0].startswith(
        "cosyvoice: unknown option 'fp_16'; the options are: checkout, fp16, ")


# --- warm-up -------------------------------------------------------------------------------------


def test_load_warms_up_streamed_and_whole(engine, layout):
    checkout, _ = layout
    calls = calls_of(engine, "inference_zero_shot")
    assert [call["stream"] for call in calls] == [False, True]
    for call in calls:
        assert call["prompt_text"] == WARMUP_PROMPT_TEXT and call["zero_shot_spk_id"] == ""
    # the checkout's prompt went through the engine's own decoding: a temporary
    # 24 kHz float WAV, removed afterwards
    reads = engine.standin.frontend.prompt_reads
    assert len(reads) == 2 and all(read["sample_rate"] == 24000 for read in reads)
    assert all(not os.path.exists(read["path"]) for read in reads)
    assert engine.describe()["warmup_s"] is not None
    # the warm-up's stream grew the hop length; the next request still starts at 25
    assert engine.standin.model.token_hop_len > 25
    drain(engine.tts(make_ctx(stream=True), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT))
    assert engine.standin.model.stream_hops == [25, 25]  # the warm-up's, then this one


def test_warmup_can_be_turned_off(make_engine):
    engine = make_engine(warmup=False)
    assert engine.standin.calls == [] and engine.describe()["warmup_s"] is None


# --- results -------------------------------------------------------------------------------------


def test_zero_shot_whole(engine):
    send = Recorder()
    result = engine.tts(make_ctx(send=send), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    assert set(result) == {"audio", "sample_rate", "format", "channels", "samples", "duration_s"}
    audio_out = result["audio"]
    assert isinstance(audio_out, numpy.ndarray) and audio_out.dtype == numpy.float32
    assert audio_out.ndim == 1 and audio_out.flags.c_contiguous
    assert result["sample_rate"] == SAMPLE_RATE and result["format"] == "float32"
    assert result["channels"] == 1 and result["samples"] == len(audio_out)
    assert result["duration_s"] == pytest.approx(len(audio_out) / 24000.0)
    expected = segment_audio(TEXT, prompt_amplitude(PROMPT_SECONDS * 24000, 24000))
    numpy.testing.assert_array_equal(audio_out, expected)
    call = calls_of(engine, "inference_zero_shot")[-1]
    assert call["tts_text"] == TEXT and call["prompt_text"] == PROMPT_TEXT
    assert call["stream"] is False and call["speed"] == 1.0 and call["zero_shot_spk_id"] == ""
    fractions = [value["fraction"] for value in send.progress()]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0


def test_segments_are_joined(engine):
    text = "First sentence here. And a second, longer one!"
    result = engine.tts(make_ctx(), text, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    amplitude = prompt_amplitude(PROMPT_SECONDS * 24000, 24000)
    expected = numpy.concatenate([segment_audio("First sentence here.", amplitude),
                                  segment_audio("And a second, longer one!", amplitude)])
    numpy.testing.assert_array_equal(result["audio"], expected)


def test_speed_shortens_the_audio(engine):
    normal = engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    fast = engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, speed=1.5)
    assert fast["samples"] == int(normal["samples"] / 1.5)
    assert calls_of(engine, "inference_zero_shot")[-1]["speed"] == 1.5


# --- streaming -----------------------------------------------------------------------------------


def test_streamed_chunks_concatenate_to_the_whole(engine):
    whole = engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    send = Recorder()
    stream = engine.tts(make_ctx(stream=True, send=send), TEXT, prompt_audio=PROMPT,
                        prompt_text=PROMPT_TEXT)
    assert not isinstance(stream, dict)
    chunks, summary = drain(stream)
    for chunk in chunks:
        assert set(chunk) == {"audio", "sample_rate"} and chunk["sample_rate"] == 24000
        assert chunk["audio"].dtype == numpy.float32 and chunk["audio"].ndim == 1
    # as upstream produces them: hops of 25 then 50 tokens while 3 more are left, then the rest
    assert [len(chunk["audio"]) for chunk in chunks] == [
        25 * SAMPLES_PER_TOKEN, 50 * SAMPLES_PER_TOKEN, 21 * SAMPLES_PER_TOKEN]
    joined = numpy.concatenate([chunk["audio"] for chunk in chunks])
    numpy.testing.assert_array_equal(joined, whole["audio"])
    assert summary == {"sample_rate": 24000, "format": "float32", "channels": 1,
                       "samples": len(joined), "duration_s": len(joined) / 24000.0, "chunks": 3}
    assert calls_of(engine, "inference_zero_shot")[-1]["stream"] is True
    fractions = [value["fraction"] for value in send.progress()]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0


def test_the_stream_argument_overrides_the_context(engine):
    chunks, summary = drain(engine.tts(make_ctx(stream=False), TEXT, prompt_audio=PROMPT,
                                       prompt_text=PROMPT_TEXT, stream=True))
    assert len(chunks) == 3 and summary["chunks"] == 3
    result = engine.tts(make_ctx(stream=True), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT,
                        stream=False)
    assert isinstance(result, dict) and len(result["audio"]) == summary["samples"]


def test_each_streaming_request_starts_from_the_initial_hop(engine):
    model = engine.standin.model
    first, _ = drain(engine.tts(make_ctx(stream=True), TEXT, prompt_audio=PROMPT,
                                prompt_text=PROMPT_TEXT))
    assert model.token_hop_len == 100  # upstream's in-place growth: 25 -> 50 -> 100
    second, _ = drain(engine.tts(make_ctx(stream=True), TEXT, prompt_audio=PROMPT,
                                 prompt_text=PROMPT_TEXT))
    assert model.stream_hops[-2:] == [25, 25]
    assert [len(c["audio"]) for c in first] == [len(c["audio"]) for c in second]


def test_without_the_reset_the_hop_grows_across_requests(engine):
    # What the reset is for: upstream's object alone starts the second request at 100.
    standin = engine.standin
    standin.model.token_hop_len = 25
    prompt = os.path.join(engine.checkout, "asset", "zero_shot_prompt.wav")
    for _ in range(2):
        list(standin.inference_zero_shot(TEXT, "x", prompt, stream=True))
    assert standin.model.stream_hops[-2:] == [25, 100]


def test_cancel_between_chunks_releases_the_engine(engine):
    ctx = make_ctx(stream=True)
    stream = engine.tts(ctx, TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    next(stream)
    ctx.cancel()
    with pytest.raises(Cancelled):
        next(stream)
    reads = engine.standin.frontend.prompt_reads
    assert not os.path.exists(reads[-1]["path"])  # the temporary prompt is gone
    assert engine.tts(make_ctx(), TEXT, voice=None, prompt_audio=PROMPT,
                      prompt_text=PROMPT_TEXT)["samples"] > 0


def test_an_abandoned_stream_releases_the_engine(engine):
    stream = engine.tts(make_ctx(stream=True), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    next(stream)
    stream.close()
    done = []
    worker = threading.Thread(target=lambda: done.append(
        engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)))
    worker.start()
    worker.join(10)
    assert done and done[0]["samples"] > 0


# --- modes ---------------------------------------------------------------------------------------


def test_cross_lingual_passes_no_prompt_text(engine):
    result = engine.tts(make_ctx(), TEXT, mode="cross_lingual", prompt_audio=PROMPT)
    call = calls_of(engine, "inference_cross_lingual")[-1]
    assert call["tts_text"] == TEXT and call["zero_shot_spk_id"] == ""
    assert call["prompt_wav"].endswith(".wav") and not os.path.exists(call["prompt_wav"])
    assert result["samples"] == len(TEXT) * 4 * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("given, sent", [
    ("Speak slowly and softly.", "Speak slowly and softly." + END_OF_PROMPT),
    ("用四川话说这句话" + END_OF_PROMPT, "用四川话说这句话" + END_OF_PROMPT),
    ("Whisper." + END_OF_PROMPT + "  ", "Whisper." + END_OF_PROMPT + "  "),
])
def test_instruct_ends_with_the_end_of_prompt_marker(engine, given, sent):
    engine.tts(make_ctx(), TEXT, mode="instruct", instruct_text=given, prompt_audio=PROMPT)
    call = calls_of(engine, "inference_instruct2")[-1]
    assert call["instruct_text"] == sent and call["zero_shot_spk_id"] == ""


def test_instruct_marker_in_the_middle_is_refused(engine):
    with pytest.raises(BadArguments, match="in the middle"):
        engine.tts(make_ctx(), TEXT, mode="instruct", prompt_audio=PROMPT,
                   instruct_text="one" + END_OF_PROMPT + "two")


def test_sft_with_a_builtin_speaker(engine):
    result = engine.tts(make_ctx(), TEXT, mode="sft", voice=BUILTIN_SPEAKER)
    numpy.testing.assert_array_equal(result["audio"], segment_audio(TEXT, BUILTIN_AMPLITUDE))
    assert calls_of(engine, "inference_sft")[-1]["spk_id"] == BUILTIN_SPEAKER


def test_text_frontend_is_passed_on(engine):
    engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT, text_frontend=False)
    assert calls_of(engine, "inference_zero_shot")[-1]["text_frontend"] is False


# --- voices --------------------------------------------------------------------------------------


def test_register_and_reuse_a_voice(engine):
    direct = engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    registered = engine.register_voice(make_ctx(), "alice", PROMPT, PROMPT_TEXT)
    assert registered == {"voice_id": "alice", "prompt_text": PROMPT_TEXT, "duration_s": 2.0,
                          "sample_rate": 16000, "replaced": False}
    add = calls_of(engine, "add_zero_shot_spk")
    assert len(add) == 1 and add[0]["zero_shot_spk_id"] == "alice"
    assert add[0]["prompt_text"] == PROMPT_TEXT and not os.path.exists(add[0]["prompt_wav"])
    reads = len(engine.standin.frontend.prompt_reads)
    for _ in range(3):  # a chat loop: no prompt audio sent, none read again
        again = engine.tts(make_ctx(), TEXT, voice="alice")
        numpy.testing.assert_array_equal(again["audio"], direct["audio"])
    assert len(engine.standin.frontend.prompt_reads) == reads
    call = calls_of(engine, "inference_zero_shot")[-1]
    assert call["zero_shot_spk_id"] == "alice" and call["prompt_wav"] == ""
    assert call["prompt_text"] == ""
    assert engine.voices(make_ctx())["registered"] == [
        {"voice_id": "alice", "prompt_text": PROMPT_TEXT, "duration_s": 2.0,
         "sample_rate": 16000}]
    streamed, _ = drain(engine.tts(make_ctx(stream=True), TEXT, voice="alice"))
    numpy.testing.assert_array_equal(numpy.concatenate([c["audio"] for c in streamed]),
                                     direct["audio"])


def test_a_voice_in_cross_lingual_and_instruct(engine):
    engine.register_voice(make_ctx(), "alice", PROMPT, PROMPT_TEXT)
    engine.tts(make_ctx(), TEXT, mode="cross_lingual", voice="alice")
    call = calls_of(engine, "inference_cross_lingual")[-1]
    assert call["zero_shot_spk_id"] == "alice" and call["prompt_wav"] == ""
    # instruct: upstream would replace the instruct text by the registered
    # prompt text, so the voice goes over as its prompt audio
    engine.tts(make_ctx(), TEXT, mode="instruct", voice="alice", instruct_text="Sing it.")
    call = calls_of(engine, "inference_instruct2")[-1]
    assert call["zero_shot_spk_id"] == "" and call["instruct_text"] == "Sing it." + END_OF_PROMPT
    read = engine.standin.frontend.prompt_reads[-1]
    assert read["path"] == call["prompt_wav"] and read["sample_rate"] == 16000
    assert read["frames"] == 32000


def test_reregistering_replaces_and_unregister_forgets(engine):
    engine.register_voice(make_ctx(), "alice", PROMPT, PROMPT_TEXT)
    longer = wav_bytes(tone(8.0, 16000), 16000)
    assert engine.register_voice(make_ctx(), "alice", longer, "other words")["replaced"] is True
    loud = engine.tts(make_ctx(), TEXT, voice="alice")["audio"]
    assert numpy.max(loud) == pytest.approx(prompt_amplitude(8 * 16000, 16000), rel=1e-3)
    assert engine.unregister_voice(make_ctx(), "alice") == {"voice_id": "alice", "removed": True}
    assert engine.unregister_voice(make_ctx(), "alice") == {"voice_id": "alice", "removed": False}
    assert "alice" not in engine.standin.frontend.spk2info
    with pytest.raises(BadArguments, match="unknown voice 'alice'; registered voices: none"):
        engine.tts(make_ctx(), TEXT, voice="alice")


@pytest.mark.parametrize("voice_id, match", [
    ("", "voice_id must be"), ("has space", "voice_id must be"), ("-dash", "voice_id must be"),
    ("x" * 65, "voice_id must be"), (7, "voice_id must be"),
    (BUILTIN_SPEAKER, "is a built-in speaker"),
])
def test_bad_voice_ids(engine, voice_id, match):
    with pytest.raises(BadArguments, match=match):
        engine.register_voice(make_ctx(), voice_id, PROMPT, PROMPT_TEXT)


def test_register_voice_checks_its_prompt(engine):
    with pytest.raises(BadArguments, match="register_voice: prompt_audio cannot decode"):
        engine.register_voice(make_ctx(), "bob", b"not audio at all", PROMPT_TEXT)
    with pytest.raises(BadArguments, match="register_voice: prompt_text is empty"):
        engine.register_voice(make_ctx(), "bob", PROMPT, "  ")
    assert engine.voices(make_ctx())["registered"] == []


def test_a_voice_unregistered_before_the_stream_starts(engine):
    engine.register_voice(make_ctx(), "alice", PROMPT, PROMPT_TEXT)
    stream = engine.tts(make_ctx(stream=True), TEXT, voice="alice")  # checked, not started
    engine.unregister_voice(make_ctx(), "alice")
    with pytest.raises(BadArguments, match="voice 'alice' was unregistered"):
        next(stream)
    assert engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)["samples"]


def test_max_voices(make_engine):
    engine = make_engine(max_voices=2)
    engine.register_voice(make_ctx(), "a", PROMPT, PROMPT_TEXT)
    engine.register_voice(make_ctx(), "b", PROMPT, PROMPT_TEXT)
    engine.register_voice(make_ctx(), "b", PROMPT, PROMPT_TEXT)  # replacing is fine
    with pytest.raises(BadArguments, match="2 voices are registered, the limit"):
        engine.register_voice(make_ctx(), "c", PROMPT, PROMPT_TEXT)


def test_voices_survive_unload_and_load(engine):
    engine.register_voice(make_ctx(), "alice", PROMPT, PROMPT_TEXT)
    before = engine.tts(make_ctx(), TEXT, voice="alice")["audio"]
    engine.unload()
    engine.load()
    add = calls_of(engine, "add_zero_shot_spk")  # the new stand-in's calls
    assert [call["zero_shot_spk_id"] for call in add] == ["alice"]
    assert add[0]["prompt_text"] == PROMPT_TEXT
    numpy.testing.assert_array_equal(engine.tts(make_ctx(), TEXT, voice="alice")["audio"], before)


def test_voices_dir_keeps_voices_across_processes(make_engine, tmp_path):
    voices_dir = tmp_path / "voices"
    first = make_engine(voices_dir=str(voices_dir))
    first.register_voice(make_ctx(), "alice", PROMPT, "words, with unicode: 希望")
    first.register_voice(make_ctx(), "bob", PROMPT, PROMPT_TEXT)
    first.unregister_voice(make_ctx(), "bob")
    before = first.tts(make_ctx(), TEXT, voice="alice")["audio"]
    assert sorted(os.listdir(str(voices_dir))) == ["alice.json", "alice.wav"]
    second = make_engine(voices_dir=str(voices_dir))  # as if the process had restarted
    assert [v["voice_id"] for v in second.voices(make_ctx())["registered"]] == ["alice"]
    registered = second.voices(make_ctx())["registered"]
    assert registered[0]["prompt_text"] == "words, with unicode: 希望"
    numpy.testing.assert_array_equal(second.tts(make_ctx(), TEXT, voice="alice")["audio"], before)


# --- argument checks -----------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, match", [
    ({"text": ""}, "tts: text is empty"),
    ({"text": "   "}, "tts: text is empty"),
    ({"text": 42}, "tts: text must be a string"),
    ({"text": "x" * 5001}, "5001 characters; the limit is 5000"),
    ({"text": "a\x00b"}, "NUL"),
    ({"mode": "clone"}, "mode must be one of zero_shot, cross_lingual, instruct, sft, not 'clone'"),
    ({}, "mode 'zero_shot' needs a voice: prompt_audio="),
    ({"prompt_audio": PROMPT}, "mode 'zero_shot' with prompt_audio needs prompt_text="),
    ({"prompt_text": PROMPT_TEXT}, "needs a voice"),
    ({"mode": "cross_lingual"}, "mode 'cross_lingual' needs a voice"),
    ({"mode": "cross_lingual", "prompt_audio": PROMPT, "prompt_text": "x"},
     "'cross_lingual' takes no prompt_text"),
    ({"mode": "instruct", "prompt_audio": PROMPT}, "mode 'instruct' needs instruct_text="),
    ({"mode": "instruct", "prompt_audio": PROMPT, "instruct_text": ""}, "instruct_text is empty"),
    ({"mode": "instruct", "prompt_audio": PROMPT, "instruct_text": "x", "prompt_text": "y"},
     "takes instruct_text=, not prompt_text="),
    ({"prompt_audio": PROMPT, "prompt_text": "x", "instruct_text": "y"},
     "instruct_text is for mode 'instruct'"),
    ({"voice": "nobody"}, "unknown voice 'nobody'; registered voices: none"),
    ({"voice": 3}, "voice must be a string"),
    ({"voice": "nobody", "prompt_audio": PROMPT}, "either voice="),
    ({"mode": "sft"}, "mode 'sft' needs voice=, one of the built-in speakers (standin_speaker)"),
    ({"mode": "sft", "voice": "nobody"}, "'nobody' is not a built-in speaker"),
    ({"mode": "sft", "voice": BUILTIN_SPEAKER, "prompt_audio": PROMPT}, "takes no prompt_audio"),
    ({"speed": 0}, "speed must be a number from 0.5 to 2.0, not 0"),
    ({"speed": 3}, "speed must be a number from 0.5 to 2.0, not 3"),
    ({"speed": "fast"}, "speed must be a number"),
    ({"speed": True}, "speed must be a number"),
    ({"speed": float("nan")}, "speed must be a number"),
    ({"speed": 1.5, "stream": True}, "speed works only without streaming"),
    ({"stream": "yes"}, "stream must be true, false or left out"),
    ({"text_frontend": "no"}, "text_frontend must be true or false"),
])
def test_bad_arguments(engine, arguments, match):
    arguments = dict(arguments)
    arguments.setdefault("text", TEXT)
    with pytest.raises(BadArguments) as info:
        engine.tts(make_ctx(), **arguments)
    assert match in info.value.message


def test_speed_with_a_streaming_context_is_refused(engine):
    with pytest.raises(BadArguments, match="speed works only without streaming"):
        engine.tts(make_ctx(stream=True), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT,
                   speed=0.8)


def test_none_means_the_default(engine):
    result = engine.tts(make_ctx(), TEXT, mode=None, voice=None, prompt_audio=PROMPT,
                        prompt_text=PROMPT_TEXT, instruct_text=None, speed=None, stream=None,
                        text_frontend=None)
    assert result["samples"] == len(TEXT) * 4 * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("data, match", [
    (b"", "prompt_audio is empty"),
    (b"RIFF\x00\x00\x00\x00WAVEjunk" * 10, "prompt_audio cannot decode 160 bytes as audio"),
    (wav_bytes(tone(31.0, 16000), 16000), "prompt_audio is 31.00 s long; the limit is 30 s"),
    (wav_bytes(tone(0.2, 16000), 16000), "prompt_audio is 0.20 s long; a prompt needs at least"),
    (wav_bytes(tone(2.0, 8000), 8000), "prompt_audio sample rate is 8000 Hz; CosyVoice2 needs "
                                       "at least 16000 Hz"),
    (wav_bytes(numpy.full(32000, numpy.nan), 16000), "not finite"),
    (wav_bytes(tone(2.0, 16000), 16000, format="FLAC", subtype="PCM_16")[:-3000],
     "prompt_audio cannot decode"),
    ("a string", "expected the bytes of an audio file"),
], ids=["empty", "garbage", "too-long", "too-short", "8kHz", "nan", "truncated", "str"])
def test_bad_prompt_audio(engine, data, match):
    with pytest.raises(BadArguments) as info:
        engine.tts(make_ctx(), TEXT, prompt_audio=data, prompt_text=PROMPT_TEXT)
    assert match in info.value.message
    assert info.value.message.startswith("tts: prompt_audio")


# --- prompt audio: decoding and resampling -------------------------------------------------------


def test_prompt_files_reach_upstream_as_mono_float(engine):
    stereo = wav_bytes(tone(3.0, 48000, channels=2), 48000, subtype="PCM_16")
    engine.tts(make_ctx(), TEXT, mode="cross_lingual", prompt_audio=stereo)
    read = engine.standin.frontend.prompt_reads[-1]
    assert read == {"path": read["path"], "sample_rate": 24000, "frames": 72000, "channels": 1,
                    "subtype": "FLOAT"}
    flac = wav_bytes(tone(2.5, 22050), 22050, format="FLAC", subtype="PCM_16")
    engine.tts(make_ctx(), TEXT, mode="cross_lingual", prompt_audio=flac)
    read = engine.standin.frontend.prompt_reads[-1]
    assert (read["sample_rate"], read["frames"]) == (22050, int(2.5 * 22050))


def test_decode_downmixes_by_averaging():
    left = tone(1.0, 16000, amplitude=0.6)
    right = numpy.zeros_like(left)
    prompt = audio.decode_prompt(wav_bytes(numpy.stack([left, right], axis=1), 16000))
    assert prompt.sample_rate == 16000 and prompt.source_channels == 2
    numpy.testing.assert_allclose(prompt.samples, left / 2, atol=1e-6)


def test_decode_keeps_rates_up_to_24k_and_lowers_the_rest():
    for rate, stored in ((16000, 16000), (22050, 22050), (24000, 24000), (44100, 24000),
                         (48000, 24000), (96000, 24000)):
        prompt = audio.decode_prompt(wav_bytes(tone(1.5, rate), rate))
        assert (prompt.sample_rate, prompt.source_rate) == (stored, rate)
        assert len(prompt.samples) == int(math.ceil(1.5 * rate * stored / rate))
        assert prompt.samples.dtype == numpy.float32


@pytest.mark.parametrize("source, target, count", [
    (48000, 24000, 48000), (44100, 24000, 44100), (16000, 24000, 16000), (24000, 16000, 24001),
    (22050, 24000, 1000), (8000, 48000, 7), (44100, 24000, 1), (44100, 24000, 0),
])
def test_resample_lengths_are_exact(source, target, count):
    out = audio.resample(numpy.zeros(count), source, target)
    assert out.dtype == numpy.float32 and len(out) == -(-count * target // source)


@pytest.mark.parametrize("source, target", [
    (48000, 24000), (44100, 24000), (16000, 24000), (22050, 24000), (192000, 24000),
    (24000, 16000),
])
def test_a_tone_stays_a_tone(source, target):
    frequency = 1000.0
    out = audio.resample(tone(1.0, source, frequency=frequency, amplitude=0.5), source, target)
    assert len(out) == target
    assert dominant_frequency(out, target) == pytest.approx(frequency, abs=1.5)
    ideal = tone(1.0, target, frequency=frequency, amplitude=0.5)
    inner = slice(target // 20, -target // 20)  # away from the edges' zero padding
    assert numpy.max(numpy.abs(out[inner] - ideal[inner])) < 1e-4


def test_resample_removes_what_the_new_rate_cannot_hold():
    above = tone(1.0, 48000, frequency=15000.0, amplitude=0.5)  # over 24 kHz's Nyquist
    out = audio.resample(above, 48000, 24000)
    assert numpy.sqrt(numpy.mean(out[1000:-1000] ** 2)) < 1e-3


def test_resample_keeps_a_constant_and_the_identity():
    out = audio.resample(numpy.ones(44100), 44100, 24000)
    numpy.testing.assert_allclose(out[200:-200], 1.0, atol=1e-6)
    samples = numpy.random.RandomState(0).randn(1000)
    numpy.testing.assert_array_equal(audio.resample(samples, 16000, 16000),
                                     samples.astype(numpy.float32))
    with pytest.raises(ValueError):
        audio.resample(numpy.zeros((2, 10)), 16000, 24000)


def test_resample_agrees_with_scipy():
    signal = pytest.importorskip("scipy.signal")
    samples = numpy.random.RandomState(1).randn(44100)
    samples = signal.lfilter(*signal.butter(8, 0.4), samples)  # band-limited noise
    ours = audio.resample(samples, 44100, 24000)
    theirs = signal.resample_poly(samples, 80, 147)
    inner = slice(500, -500)
    assert numpy.max(numpy.abs(ours[inner] - theirs[inner])) < 0.01 * numpy.max(numpy.abs(theirs))


# --- tiers ---------------------------------------------------------------------------------------


def test_offload_and_onload_move_the_modules_and_speakers(engine):
    engine.register_voice(make_ctx(), "alice", PROMPT, PROMPT_TEXT)
    before = engine.tts(make_ctx(), TEXT, voice="alice")["audio"]
    standin = engine.standin
    modules = [standin.model.llm, standin.model.flow, standin.model.hift]
    engine.offload()
    assert [module.moves for module in modules] == [["cpu"]] * 3
    for entry in standin.frontend.spk2info.values():
        for value in entry.values():
            assert value.device.type == "cpu"
    assert engine.describe()["tier"] == "offloaded"
    # on the CPU provider already: the tokenizer session is left as it is
    tokenizer = standin.frontend.speech_tokenizer_session
    engine.onload()
    assert [module.moves for module in modules] == [["cpu", "cpu"]] * 3  # back to model.device
    assert standin.frontend.speech_tokenizer_session is tokenizer
    assert engine.describe()["tier"] == "resident"
    numpy.testing.assert_array_equal(engine.tts(make_ctx(), TEXT, voice="alice")["audio"], before)


def test_unload_drops_the_model(engine):
    import weakref

    standin = weakref.ref(engine.standin)
    llm = weakref.ref(engine.standin.model.llm)
    engine.unload()
    gc.collect()
    assert standin() is None and llm() is None
    assert engine.describe()["tier"] == "unloaded"
    with pytest.raises(RuntimeError, match="not loaded"):
        engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)
    engine.load()
    assert engine.describe()["loads"] == 2
    assert engine.tts(make_ctx(), TEXT, prompt_audio=PROMPT, prompt_text=PROMPT_TEXT)["samples"]


def test_a_failed_warmup_leaves_nothing_loaded(make_engine, layout):
    checkout, _ = layout
    os.unlink(os.path.join(checkout, "asset", "zero_shot_prompt.wav"))
    engine = make_engine(load=False)
    with pytest.raises(OSError):
        engine.load()
    assert engine.standin is None and engine.describe()["tier"] == "unloaded"


# --- preflight -----------------------------------------------------------------------------------


def test_preflight_passes_on_a_complete_layout(layout):
    checkout, model_dir = layout
    assert CosyVoiceEngine.preflight({"checkout": checkout, "model_dir": model_dir}) == []


def test_preflight_without_options():
    assert CosyVoiceEngine.preflight({}) == [
        "cosyvoice: option 'checkout' is not set: it must name a clone of "
        "https://github.com/FunAudioLLM/CosyVoice at commit {} (see "
        "daemons/cosyvoice/README.md)".format(UPSTREAM_COMMIT),
        "cosyvoice: option 'model_dir' is not set: it must name the downloaded CosyVoice2-0.5B "
        "directory (see daemons/cosyvoice/README.md)"]


def test_preflight_names_missing_directories(tmp_path):
    checkout, model_dir = str(tmp_path / "nope"), str(tmp_path / "models")
    assert CosyVoiceEngine.preflight({"checkout": checkout, "model_dir": model_dir}) == [
        "CosyVoice checkout not found at {}: expected a clone of "
        "https://github.com/FunAudioLLM/CosyVoice at commit {} (`git clone --recursive`; see "
        "daemons/cosyvoice/README.md)".format(checkout, UPSTREAM_COMMIT),
        "CosyVoice2 model directory not found at {}: expected the FunAudioLLM/CosyVoice2-0.5B "
        "model from HuggingFace or ModelScope (see daemons/cosyvoice/README.md)".format(
            model_dir)]


def test_preflight_names_each_missing_file(layout):
    checkout, model_dir = layout
    os.unlink(os.path.join(checkout, "cosyvoice", "cli", "cosyvoice.py"))
    os.unlink(os.path.join(checkout, "third_party", "Matcha-TTS", "matcha", "__init__.py"))
    os.unlink(os.path.join(checkout, "asset", "zero_shot_prompt.wav"))
    os.unlink(os.path.join(model_dir, "hift.pt"))
    os.rename(os.path.join(model_dir, "cosyvoice2.yaml"), os.path.join(model_dir, "cosyvoice.yaml"))
    with open(os.path.join(model_dir, "llm.pt"), "w") as handle:
        handle.write("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2\n")
    os.unlink(os.path.join(model_dir, "CosyVoice-BlankEN", "vocab.json"))
    download = ("the FunAudioLLM/CosyVoice2-0.5B model from HuggingFace or ModelScope (see "
                "daemons/cosyvoice/README.md)")
    clone = ("a clone of https://github.com/FunAudioLLM/CosyVoice at commit {} (`git clone "
             "--recursive`; see daemons/cosyvoice/README.md)".format(UPSTREAM_COMMIT))
    assert CosyVoiceEngine.preflight({"checkout": checkout, "model_dir": model_dir}) == [
        "{}/cosyvoice/cli/cosyvoice.py not found: {} is not a CosyVoice checkout; expected "
        "{}".format(checkout, checkout, clone),
        "{}/third_party/Matcha-TTS/matcha/__init__.py not found: the Matcha-TTS submodule is not "
        "checked out; run `git -C {} submodule update --init --recursive`".format(
            checkout, checkout),
        "{}/asset/zero_shot_prompt.wav not found: the warm-up at load reads this prompt from the "
        "checkout; restore it (`git -C {} checkout -- asset/zero_shot_prompt.wav`) or set "
        "warmup: false".format(checkout, checkout),
        "{}/cosyvoice2.yaml not found: expected the model's hyperpyyaml configuration of {}; "
        "this directory has cosyvoice.yaml, the name in older downloads of CosyVoice2-0.5B: "
        "download the current one".format(model_dir, download),
        "{}/llm.pt is a Git LFS pointer, not the file: run `git lfs pull` in {} (or download "
        "with huggingface-cli / modelscope)".format(model_dir, model_dir),
        "{}/hift.pt not found: expected the HiFT vocoder's weights of {}".format(
            model_dir, download),
        "{}/CosyVoice-BlankEN/tokenizer.json not found: expected the Qwen2 tokenizer "
        "(tokenizer.json or vocab.json) of {}".format(model_dir, download),
    ]
    # without the warm-up, its prompt is not needed
    assert not any("zero_shot_prompt" in line for line in CosyVoiceEngine.preflight(
        {"checkout": checkout, "model_dir": model_dir, "warmup": False}))


def test_preflight_follows_the_options(layout, tmp_path):
    checkout, model_dir = layout
    problems = CosyVoiceEngine.preflight({"checkout": checkout, "model_dir": model_dir,
                                          "load_jit": True, "fp16": True})
    assert problems == ["{}/flow.encoder.fp16.zip not found: expected the TorchScript flow "
                        "encoder that load_jit loads of the FunAudioLLM/CosyVoice2-0.5B model "
                        "from HuggingFace or ModelScope (see daemons/cosyvoice/README.md)".format(
                            model_dir)]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    problems = CosyVoiceEngine.preflight({"checkout": checkout, "model_dir": model_dir,
                                          "voices_dir": str(not_a_dir), "max_voices": -1})
    assert problems == [
        "cosyvoice: option 'max_voices' must be an integer >= 0, not -1",
        "voices_dir {} is not a directory: expected a directory for registered voices (it is "
        "created when missing)".format(not_a_dir)]


def test_preflight_imports_nothing_heavy(layout):
    checkout, model_dir = layout
    code = ("import sys, json\n"
            "from modelhost.daemons.cosyvoice.engine import CosyVoiceEngine\n"
            "problems = CosyVoiceEngine.preflight({'checkout': sys.argv[1], 'model_dir': "
            "sys.argv[2], 'load_vllm': True})\n"
            "heavy = [m for m in ('torch', 'numpy', 'soundfile', 'onnxruntime', 'cosyvoice') "
            "if m in sys.modules]\n"
            "print(json.dumps([problems, heavy]))\n")
    output = subprocess.check_output([sys.executable, "-c", code, checkout, model_dir])
    problems, heavy = __import__("json").loads(output)
    assert heavy == []
    assert len(problems) == 1 and problems[0].startswith(
        "load_vllm is set but vLLM is not installed in ")


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_streaming_through_modelhost_up(make_host, layout, tmp_path):
    checkout, model_dir = layout
    options = "{{checkout: {}, model_dir: {}, voices_dir: {}}}".format(
        checkout, model_dir, tmp_path / "voices")
    host = make_host([daemon_yaml("cosyvoice",
                                  engine="cosyvoice_standin_engine:CosyVoiceStandInEngine",
                                  options=options, max_payload="32MiB")]).start()
    host.wait_ready("cosyvoice")
    client = host.client()
    whole = client.call("cosyvoice", "tts", text=TEXT, prompt_audio=PROMPT,
                        prompt_text=PROMPT_TEXT, timeout=30)
    assert whole["sample_rate"] == 24000 and whole["audio"].dtype == numpy.float32
    progress = []
    stream = client.stream("cosyvoice", "tts", text=TEXT, prompt_audio=PROMPT,
                           prompt_text=PROMPT_TEXT, stream=True, timeout=30,
                           on_progress=progress.append)
    chunks = list(stream)
    assert len(chunks) == 3
    assert all(chunk["audio"].dtype == numpy.float32 and chunk["audio"].ndim == 1
               for chunk in chunks)
    numpy.testing.assert_array_equal(numpy.concatenate([c["audio"] for c in chunks]),
                                     whole["audio"])
    assert stream.result["chunks"] == 3 and stream.result["samples"] == len(whole["audio"])
    # a registered voice, reused without its audio; and the stream=True call a second time
    # starts from the same hop (same chunking)
    client.call("cosyvoice", "register_voice", voice_id="alice", prompt_audio=PROMPT,
                prompt_text=PROMPT_TEXT, timeout=30)
    again = list(client.stream("cosyvoice", "tts", text=TEXT, voice="alice", stream=True,
                               timeout=30))
    assert [len(c["audio"]) for c in again] == [len(c["audio"]) for c in chunks]
    error = None
    try:
        client.call("cosyvoice", "tts", text=TEXT, voice="nobody", timeout=30)
    except Exception as exc:  # modelhost.BadArguments on the client side
        error = exc
    assert type(error).__name__ == "BadArguments" and "unknown voice 'nobody'" in str(error)
    facts = host.daemon("cosyvoice")
    assert facts["state"] in ("ready", "busy")
