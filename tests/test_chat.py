"""The chat loop (modelhost.pipelines.chat): its sentence splitter, configuration and voice
detector, and turns end to end through a real `modelhost up`.

End to end, the TTS and ASR daemons are the embedded default's own (espeak and
pocketsphinx, the sections of config/default.yaml, in their venvs on Python
3.12), the language model is a local OpenAI-compatible TEST SERVER
(tests/openai_test_server.py: a fixed reply streamed as chat.completion.chunk
events, which can hold mid-stream until the test releases it), and the talking
head is the TalkingGaussian STAND-IN engine (real ffmpeg, stand-in model).
Calls that a test must catch mid-flight run on gated engines
(tests/engines/chat_standin_engine.py: the real espeak and the stand-in head,
holding a stream after its first chunk while a gate file exists). No test
waits on a clock: each waits for an event, a file or a broker event.
"""

import json
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import pytest

numpy = pytest.importorskip("numpy")
pytest.importorskip("openai")

import modelhost  # noqa: E402
from modelhost.pipelines import chat_io  # noqa: E402
from modelhost.pipelines.chat import (Chat, ChatConfig, ChatConfigError,  # noqa: E402
                                      load_config_file)
from modelhost.pipelines.sentences import SentenceSplitter  # noqa: E402

from conftest import ROOT, TEST_STATE, Host, daemon_yaml  # noqa: E402
from openai_test_server import OpenAITestServer  # noqa: E402

# --- the sentence splitter -----------------------------------------------------------------


def split(text):
    return SentenceSplitter().sentences(text)


def split_streamed(text, step=1):
    splitter = SentenceSplitter()
    found = []
    for i in range(0, len(text), step):
        found += splitter.feed(text[i:i + step])
    rest = splitter.flush()
    return found + ([rest] if rest else [])


@pytest.mark.parametrize("text, expected", [
    ("Hello there. How are you? I am fine!", ["Hello there.", "How are you?", "I am fine!"]),
    ("Pi is 3.14159 roughly. Next.", ["Pi is 3.14159 roughly.", "Next."]),
    ("It costs $4.50, or 4.5 euros. Cheap.", ["It costs $4.50, or 4.5 euros.", "Cheap."]),
    ("Version 2.0.1 is out. Update now.", ["Version 2.0.1 is out.", "Update now."]),
    ("Dr. Smith met Mr. Jones at St. Paul's. They talked.",
     ["Dr. Smith met Mr. Jones at St. Paul's.", "They talked."]),
    ("Bring fruit, e.g. apples or pears. Thanks.",
     ["Bring fruit, e.g. apples or pears.", "Thanks."]),
    ("I live in the U.S. and work there. Yes.",
     ["I live in the U.S. and work there.", "Yes."]),
    ("J. R. R. Tolkien wrote it. Read it.", ["J. R. R. Tolkien wrote it.", "Read it."]),
    ("She was taller than I. Then she left.", ["She was taller than I.", "Then she left."]),
    ("Well... maybe not. Or yes… who knows. Fine...", [
        "Well... maybe not.", "Or yes… who knows.", "Fine..."]),
    ("Wait... What happened?", ["Wait...", "What happened?"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ('"Why?" she asked. "Because."', ['"Why?" she asked.', '"Because."']),
    ("(That was it.) Next one.", ["(That was it.)", "Next one."]),
    ("Really?! Yes!!! Okay.", ["Really?!", "Yes!!!", "Okay."]),
    ("你好。我很好！你呢？", ["你好。", "我很好！", "你呢？"]),
    ("「行こう。」と彼は言った。", ["「行こう。」", "と彼は言った。"]),
    ("1. First item\n2. Second item", ["1. First item", "2. Second item"]),
    ("Line one\n\nLine two", ["Line one", "Line two"]),
    ("No trailing mark", ["No trailing mark"]),
    ("  Spaces   collapse .  Here.  ", ["Spaces collapse .", "Here."]),
    ("... . !", []),
])
def test_sentences(text, expected):
    assert split(text) == expected
    # Streamed a character at a time, or in odd pieces, the cuts are the same.
    assert split_streamed(text) == expected
    assert split_streamed(text, step=3) == expected


def test_a_sentence_is_given_out_as_soon_as_the_next_one_starts():
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there.") == []  # "." may be "3.14" or "Dr.": wait
    assert splitter.feed(" ") == []  # a lower-case word would continue it
    assert splitter.feed("How") == ["Hello there."]
    assert splitter.feed(" are you? I") == ["How are you?"]
    assert splitter.flush() == "I"


def test_a_run_on_reply_is_cut_at_a_comma_past_max_chars():
    text = "one, " * 30 + "and the end."
    parts = SentenceSplitter(max_chars=60).sentences(text)
    assert len(parts) > 2 and all(len(part) <= 60 for part in parts)
    assert " ".join(parts) == " ".join(text.split())


# --- configuration --------------------------------------------------------------------------


def test_config_from_a_dict_and_its_errors():
    config = ChatConfig.from_dict({
        "llm": {"url": "http://127.0.0.1:1/v1", "model": "m", "temperature": 1},
        "tts": {"model": "cosyvoice", "voice": "narrator",
                "register": {"voice_id": "narrator", "prompt_audio": "n.wav",
                             "prompt_text": "hello"}},
        "video": {"model": "head"}, "asr": {"options": {"language": "en"}},
        "lookahead": 3})
    assert config.llm.temperature == 1.0 and config.tts.register.voice_id == "narrator"
    assert config.video.method == "render" and config.asr.model == "asr"
    assert config.asr.options == {"language": "en"} and config.lookahead == 3
    assert ChatConfig.from_dict({}).video is None
    with pytest.raises(ChatConfigError, match=r"chat\.tts\.modle: unknown key; did you mean "
                                              r"'model'"):
        ChatConfig.from_dict({"tts": {"modle": "x"}})
    with pytest.raises(ChatConfigError, match=r"chat\.lookahead: expected an integer"):
        ChatConfig.from_dict({"lookahead": "2"})
    with pytest.raises(ChatConfigError, match=r"chat\.llm\.temperature: expected a number"):
        ChatConfig.from_dict({"llm": {"temperature": True}})
    with pytest.raises(ChatConfigError, match=r"chat\.tts\.register: missing prompt_text"):
        ChatConfig.from_dict({"tts": {"register": {"voice_id": "a", "prompt_audio": "b"}}})


def test_a_chat_section_in_the_modelhost_configuration(tmp_path):
    from modelhost.broker.config import load_config

    path = tmp_path / "host.yaml"
    path.write_text("broker: {log_level: info}\n"
                    "daemons:\n  espeak: {engine: 'x:Y', venv: false, python: '%s'}\n"
                    "chat:\n  llm: {url: 'http://127.0.0.1:9/v1', api_key_env: MY_KEY}\n"
                    "  tts: {voice: en-us}\n" % sys.executable)
    assert set(load_config(path).daemons) == {"espeak"}  # the broker accepts and skips it
    config, data = load_config_file(path)
    assert config.llm.api_key_env == "MY_KEY" and config.tts.voice == "en-us"
    alone = tmp_path / "chat.json"
    alone.write_text(json.dumps({"tts": {"model": "espeak"}, "out_dir": "o"}))
    assert load_config_file(alone)[0].out_dir == "o"
    bad = tmp_path / "bad.yaml"
    bad.write_text("chat:\n  vidoe: {model: head}\n")
    with pytest.raises(ChatConfigError, match="chat.vidoe: unknown key; did you mean 'video'"):
        load_config_file(bad)


# --- the voice detector ---------------------------------------------------------------------


def test_voice_activity_finds_speech_over_a_learned_noise_floor():
    rate = 16000
    rng = numpy.random.default_rng(0)
    hum = (300 * rng.standard_normal(rate * 2)).astype("<i2")  # -40 dBFS of noise
    t = numpy.arange(rate) / float(rate)
    speech = (8000 * numpy.sin(2 * numpy.pi * 220 * t)).astype("<i2")
    signal = numpy.concatenate([hum, speech + hum[:rate], hum]).tobytes()
    vad = chat_io.VoiceActivity(rate, threshold_db=-50.0)
    decisions = [(index, vad.feed(frame)) for index, frame in
                 enumerate(chat_io.frames_of(signal, rate))]
    found = [(index * 0.03, what) for index, what in decisions if what]
    assert [what for _, what in found] == ["start", "end"]
    assert 2.0 < found[0][0] < 2.2  # 90 ms into the tone
    assert 3.55 < found[1][0] < 3.7  # 0.6 s after it ends


# --- end to end --------------------------------------------------------------------------


def default_daemons():
    """The embedded default's daemon sections (espeak, asr) as they are, in the venvs the
    default's own tests use (the tests' state dir), as YAML text."""
    import yaml

    path = ROOT / "config" / "default.yaml"
    daemons = yaml.safe_load(path.read_text())["daemons"]
    text = ""
    for name in ("espeak", "asr"):
        section = dict(daemons[name])
        section["requirements"] = str((path.parent / section["requirements"]).resolve())
        section["venv"] = str(TEST_STATE / "venvs" / name)
        text += "  {}: {}\n".format(name, json.dumps(section))
    return text


def flow(options):
    return json.dumps({key: str(value) for key, value in options.items()})


class Gate(object):
    """The gate files of tests/engines/chat_standin_engine.py."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def close(self, name):
        (self.dir / ("hold-" + name)).write_text("")

    def open(self, name):
        path = self.dir / ("hold-" + name)
        if path.exists():
            path.unlink()

    def held(self, name):
        return (self.dir / ("held-" + name)).exists()

    def reset(self):
        for path in self.dir.iterdir():
            path.unlink()

    def cancelled(self):
        path = self.dir / "cancelled"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def chat_host(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests"))
    from standins.cosyvoice import make_layout
    from test_talkinggaussian import make_files

    root = tmp_path_factory.mktemp("chat")
    gate = Gate(root / "gate")
    (root / "cosyvoice").mkdir()
    checkout, model_dir = make_layout(root / "cosyvoice")
    head_files = make_files(root / "head")
    daemons = [
        default_daemons(),
        daemon_yaml("gated_tts", engine="chat_standin_engine:GatedEspeakEngine",
                    options=flow({"gate_dir": gate.dir, "voice": "en-us"}), concurrency=2),
        daemon_yaml("head", engine="chat_standin_engine:GatedTalkingHeadEngine",
                    options=flow(dict(head_files, gate_dir=gate.dir)), max_payload="64MiB",
                    ready_timeout_s=120),
        daemon_yaml("cosyvoice", engine="cosyvoice_standin_engine:CosyVoiceStandInEngine",
                    options=flow({"checkout": checkout, "model_dir": model_dir,
                                  "voices_dir": root / "voices"}), max_payload="32MiB"),
    ]
    host = Host(daemons)
    host.gate = gate
    try:
        host.start(setup=True)  # the default's venvs: built when missing or out of date
        host.wait_ready("espeak", "asr", "gated_tts", "head", "cosyvoice", timeout=600)
        yield host
    finally:
        host.stop()


@pytest.fixture
def llm():
    with OpenAITestServer(reply="Hello there. Two plus two is four. Anything else?") as server:
        yield server


class RecordingSink(chat_io.Sink):
    """Every piece of output with a global sequence number, its turn and its sentence."""

    def __init__(self):
        self.lock = threading.Condition()
        self.seq = 0
        self.items = []  # (seq, kind, turn, sentence, value)
        self.ended = []

    def _add(self, kind, turn, sentence, value):
        with self.lock:
            self.seq += 1
            self.items.append((self.seq, kind, turn, sentence, value))
            self.lock.notify_all()

    def audio(self, turn, sentence, chunk):
        self._add("audio", turn, sentence, chunk)

    def video(self, turn, sentence, segment):
        self._add("video", turn, sentence, segment)

    def turn_ended(self, result):
        with self.lock:
            self.ended.append(result.turn)
            self.lock.notify_all()

    def mark(self):
        with self.lock:
            return self.seq

    def of(self, turn, kind=None):
        with self.lock:
            return [item for item in self.items
                    if item[2] == turn and (kind is None or item[1] == kind)]

    def wait(self, predicate, timeout=120, what="the sink"):
        with self.lock:
            assert self.lock.wait_for(lambda: predicate(self), timeout), "timed out waiting " \
                "for " + what


class Events(object):
    """The chat's own events, and a condition to wait on them."""

    def __init__(self):
        self.lock = threading.Condition()
        self.items = []

    def __call__(self, event):
        with self.lock:
            self.items.append(event)
            self.lock.notify_all()

    def of(self, kind):
        with self.lock:
            return [e for e in self.items if e.kind == kind]

    def wait(self, predicate, timeout=120, what="an event"):
        with self.lock:
            assert self.lock.wait_for(lambda: predicate(self.items), timeout), \
                "timed out waiting for " + what


class BrokerEvents(object):
    """The broker's request events, collected on a thread from subscription on."""

    def __init__(self, host):
        self.host = host
        self.lock = threading.Condition()
        self.items = []
        self._client = modelhost.Client(host.endpoint)
        self._stream = self._client.events(kinds=["request"], timeout=600)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        # The subscription is live once a probe call's event comes through.
        with modelhost.Client(host.endpoint) as probe:
            deadline = time.monotonic() + 30
            while not self.find(lambda e: e["daemon"] == "espeak" and e["method"] == "voices"):
                assert time.monotonic() < deadline, "no request events from the broker"
                probe.call("espeak", "voices")
                with self.lock:
                    self.lock.wait(0.1)
        self.clear()

    def _run(self):
        for event in self._stream:
            if self._stop:
                break
            if event["daemon"] == "espeak" and event["method"] == "voices":
                event["probe"] = True
            with self.lock:
                self.items.append(event)
                self.lock.notify_all()

    def find(self, predicate):
        with self.lock:
            return [e for e in self.items if predicate(e)]

    def clear(self):
        with self.lock:
            self.items = []

    def wait(self, predicate, timeout=60, what="broker events"):
        with self.lock:
            assert self.lock.wait_for(lambda: predicate(self.items), timeout), \
                "timed out waiting for {}; saw {}".format(what, self.items)

    def close(self):
        self._stop = True
        with modelhost.Client(self.host.endpoint) as probe:
            probe.call("espeak", "voices")  # an event wakes the reader, which then stops
        self._thread.join(10)
        self._client.close()


@pytest.fixture
def broker_events(chat_host):
    events = BrokerEvents(chat_host)
    yield events
    events.close()


def config_for(llm=None, **overrides):
    data = {"llm": {"url": llm.url, "model": "test-model"} if llm is not None else {},
            "tts": {"voice": "en-us"}}
    data.update(overrides)
    return ChatConfig.from_dict(data)


def wait_until(predicate, what, timeout=60):
    """For state outside this process (files a daemon writes): poll until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def sentence_order_holds(items):
    """Audio chunks come sentence by sentence: the sentence index never goes down, and a
    sentence's chunks are contiguous."""
    sentences = [item[3] for item in items if item[1] == "audio"]
    return sentences == sorted(sentences)


@pytest.mark.slow
def test_a_text_turn_streams_audio_in_sentence_order_with_its_metrics(chat_host, llm, tmp_path,
                                                                      broker_events):
    sink = RecordingSink()
    events = Events()
    files = chat_io.FileSink(tmp_path / "out")
    with Chat(config_for(llm), endpoint=chat_host.endpoint, sink=chat_io.Sinks([sink, files]),
              on_event=events) as chat:
        result = chat.turn(text="What is two plus two?")
    assert result.outcome == "done", result.errors
    assert result.sentences == ["Hello there.", "Two plus two is four.", "Anything else?"]
    assert result.spoken == result.sentences and result.reply == llm.reply
    audio = sink.of(result.turn, "audio")
    assert {item[3] for item in audio} == {0, 1, 2} and sentence_order_holds(audio)
    assert all(item[4].sample_rate == 22050 for item in audio)
    metrics = result.metrics
    assert metrics["transcript_s"] is None and metrics["first_video_s"] is None
    assert 0 < metrics["first_token_s"] <= metrics["first_audio_s"] <= metrics["total_s"]
    # The file holds exactly the audio that was emitted, in that order.
    with wave.open(result.files["wav"]) as wav:
        assert wav.getframerate() == 22050
        assert wav.readframes(wav.getnframes()) == b"".join(item[4].pcm for item in audio)
    assert abs(result.audio_s - sum(len(i[4].pcm) for i in audio) / 2 / 22050.0) < 1e-6
    # The user's words went to the model after the system prompt.
    sent = llm.requests[-1]["body"]
    assert sent["stream"] is True and sent["model"] == "test-model"
    assert sent["messages"][0]["role"] == "system"
    assert sent["messages"][-1] == {"role": "user", "content": "What is two plus two?"}
    # Every daemon call at interactive priority: three TTS calls and the load at turn start.
    broker_events.wait(lambda items: len([e for e in items if e["method"] == "tts"]) == 3,
                       what="three tts request events")
    ours = broker_events.find(lambda e: e["daemon"] == "espeak")
    assert ours and all(e["priority"] == "interactive" for e in ours)
    assert [e["outcome"] for e in ours if e["method"] == "tts"] == ["ok"] * 3
    loads = events.of("load")
    assert loads[0].fields == {"model": "espeak", "state": "asked"}
    first_tts = next(e for e in events.items if e.kind == "call" and e.fields["record"].stage
                     == "tts")
    assert events.items.index(loads[0]) < events.items.index(first_tts)
    assert [c.outcome for c in result.calls] == ["ok"] * 4  # the LLM stream and three TTS


@pytest.mark.slow
def test_tts_calls_are_pipelined_and_audio_still_comes_in_order(chat_host, tmp_path):
    gate = chat_host.gate
    reply = "HOLD this first sentence. The second one is quick. And a third."
    sink = RecordingSink()
    events = Events()
    with OpenAITestServer(reply=reply) as server:
        config = config_for(server, tts={"model": "gated_tts"}, lookahead=3)
        with Chat(config, endpoint=chat_host.endpoint, sink=sink, on_event=events) as chat:
            gate.close("tts")
            try:
                future = chat.submit(text="Go.")

                def tts_ended(index):
                    return lambda items: any(
                        e.kind == "call" and e.fields["record"].stage == "tts"
                        and e.fields["record"].sentence == index
                        and e.fields["record"].outcome == "ok" for e in items)
                # Sentences 1 and 2 are spoken whole while sentence 0's call is held.
                events.wait(lambda items: tts_ended(1)(items) and tts_ended(2)(items),
                            what="the later sentences' speech")
                assert gate.held("tts")
                assert {item[3] for item in sink.items if item[1] == "audio"} == {0}
            finally:
                gate.open("tts")
            result = future.result(120)
    assert result.outcome == "done", result.errors
    audio = sink.of(result.turn, "audio")
    assert {item[3] for item in audio} == {0, 1, 2} and sentence_order_holds(audio)
    ended = {c.sentence: c.ended_s for c in result.calls if c.stage == "tts"}
    assert ended[1] < ended[0] and ended[2] < ended[0]  # done before, emitted after


@pytest.mark.slow
def test_a_wav_turn_goes_through_speech_recognition(chat_host, llm, tmp_path):
    with modelhost.Client(chat_host.endpoint) as client:
        said = client.call("espeak", "tts", text="what is two plus two", voice="en-us",
                           rate=150)
    path = tmp_path / "question.wav"
    path.write_bytes(chat_io.wav_bytes(said["audio"], said["sample_rate"]))
    sink = RecordingSink()
    with Chat(config_for(llm), endpoint=chat_host.endpoint, sink=sink) as chat:
        result = chat.turn(audio=str(path))
    assert result.source == "wav" and result.outcome == "done", result.errors
    # The transcript is the ASR daemon's (PocketSphinx hears espeak's question poorly, e.g.
    # "what did you do"; its text depends only on the audio).
    with modelhost.Client(chat_host.endpoint) as client:
        direct = client.transcribe(str(path))["text"]
    assert result.transcript == direct and direct.split()[0] == "what", direct
    assert llm.requests[-1]["body"]["messages"][-1]["content"] == result.transcript
    metrics = result.metrics
    assert 0 < metrics["transcript_s"] < metrics["first_token_s"] <= metrics["first_audio_s"] \
        <= metrics["total_s"]
    assert [c.stage for c in result.calls][:2] == ["asr", "llm"]
    assert result.calls[0].model == "asr" and result.calls[0].outcome == "ok"


@pytest.mark.slow
def test_echo_mode_without_a_language_model_says_so_once(chat_host):
    events = Events()
    sink = RecordingSink()
    with Chat(config_for(None), endpoint=chat_host.endpoint, sink=sink,
              on_event=events) as chat:
        first = chat.turn(text="The sky is blue.")
        second = chat.turn(text="Really blue.")
    notices = [e.fields["message"] for e in events.of("notice")]
    assert len([n for n in notices if "no language model configured" in n]) == 1
    assert first.reply == "You said: The sky is blue." and first.outcome == "done"
    assert second.sentences == ["You said: Really blue."]
    assert sink.of(second.turn, "audio") and first.metrics["first_audio_s"] > 0


@pytest.mark.slow
def test_a_language_model_that_does_not_answer_fails_the_turn_with_a_clear_message(chat_host):
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:{}/v1".format(unused.getsockname()[1])
    config = ChatConfig.from_dict({"llm": {"url": url, "model": "m", "max_retries": 0}})
    with Chat(config, endpoint=chat_host.endpoint, sink=RecordingSink()) as chat:
        result = chat.turn(text="Hello?")
        assert result.outcome == "failed" and result.spoken == []
        assert "did not answer" in result.errors[0] and url in result.errors[0]
        assert chat.turn(text="Again?").outcome == "failed"  # and the loop goes on


@pytest.mark.slow
def test_interrupt_cancels_every_call_of_the_turn_and_nothing_of_it_is_emitted_after(
        chat_host, tmp_path, broker_events):
    gate = chat_host.gate
    reply = "The first sentence is short. HOLD the second one. The third never comes."
    sink = RecordingSink()
    events = Events()
    # The reply stops after "HOLD the second one. The" (tokens 0-11: the second sentence is
    # known to be complete once the next one starts) until the client goes away.
    with OpenAITestServer(reply=reply, hold_after=12) as server:
        config = config_for(server, tts={"model": "gated_tts"}, video={"model": "head"})
        with Chat(config, endpoint=chat_host.endpoint, sink=sink, on_event=events) as chat:
            gate.reset()
            gate.close("tts")
            gate.close("video")
            try:
                future = chat.submit(text="Tell me three things.")
                # Mid-turn: the LLM stream held, sentence 1's speech held after its first
                # chunk, sentence 0's video held after its first segment.
                assert server.holding.wait(60)
                sink.wait(lambda s: s.of(1, "video") and any(i[3] == 1 for i in s.of(1, "audio")),
                          what="audio of sentence 1 and video of sentence 0")
                wait_until(lambda: gate.held("tts") and gate.held("video"),
                           "the gated calls to hold")
                assert chat.interrupt() == 1
                mark = sink.mark()
                result = future.result(60)
                # The daemons saw the cancel while their calls were still held.
                wait_until(lambda: len(gate.cancelled()) == 2, "the daemons to see the cancel")
            finally:
                gate.open("tts")
                gate.open("video")
            assert server.disconnected.wait(30)  # the LLM's HTTP stream was closed
    assert sorted(line.split()[0] for line in gate.cancelled()) == ["tts", "video"]
    assert result.outcome == "interrupted" and result.sentences == [
        "The first sentence is short.", "HOLD the second one."]
    assert result.spoken == result.sentences
    # Nothing of the turn reached the sink after interrupt() returned.
    assert [item for item in sink.of(1) if item[0] > mark] == []
    # Each call of the turn either ended before the interrupt or was cancelled.
    outcomes = {(c.stage, c.sentence): c.outcome for c in result.calls}
    assert outcomes == {("llm", None): "cancelled", ("tts", 0): "ok", ("tts", 1): "cancelled",
                        ("video", 0): "cancelled"}
    # ... and the broker says so: the held TTS and video calls ended `cancelled` in their
    # daemons (which saw the cancel: the gate's log).
    broker_events.wait(lambda items: {(e["daemon"], e["method"], e["outcome"]) for e in items}
                       >= {("gated_tts", "tts", "cancelled"), ("head", "render", "cancelled"),
                           ("gated_tts", "tts", "ok")}, what="the cancelled calls' events")
    ours = broker_events.find(lambda e: e["daemon"] in ("gated_tts", "head")
                              and e["method"] in ("tts", "render"))
    assert sorted(e["outcome"] for e in ours) == ["cancelled", "cancelled", "ok"]
    assert all(e["priority"] == "interactive" for e in ours)


@pytest.mark.slow
def test_video_segments_follow_the_audio_and_make_one_mp4(chat_host, llm, tmp_path):
    from test_talkinggaussian import decode_frames

    sink = RecordingSink()
    files = chat_io.FileSink(tmp_path / "out")
    config = config_for(llm, video={"model": "head"})
    with Chat(config, endpoint=chat_host.endpoint, sink=chat_io.Sinks([sink, files])) as chat:
        result = chat.turn(text="Show me.")
    assert result.outcome == "done", result.errors
    video = sink.of(result.turn, "video")
    assert [item[3] for item in video] == sorted(item[3] for item in video)
    assert {item[3] for item in video} == {0, 1, 2}
    for index in range(3):
        kinds = [item[4].kind for item in video if item[3] == index]
        assert kinds[0] == "init" and kinds[-1] == "index"
    # Each sentence's video starts after its audio ended.
    last_audio = {i: max(item[0] for item in sink.of(result.turn, "audio") if item[3] == i)
                  for i in range(3)}
    first_video = {i: min(item[0] for item in video if item[3] == i) for i in range(3)}
    assert all(first_video[i] > last_audio[i] for i in range(3))
    metrics = result.metrics
    assert metrics["first_audio_s"] < metrics["first_video_s"] <= metrics["total_s"]
    assert result.video_segments == len(video)
    frames, _ = decode_frames(Path(result.files["mp4"]).read_bytes(), tmp_path, "joined.mp4")
    parts = [decode_frames(Path(p).read_bytes(), tmp_path, "part.mp4")[0]
             for p in result.files["video_parts"]]
    # Every frame of the parts is in the joined file; decoding at a constant rate may repeat
    # one where a part's sound runs past its last frame (by up to 2 frames, see the daemon).
    assert len(parts) == 3
    assert sum(map(len, parts)) <= len(frames) <= sum(map(len, parts)) + 2 * len(parts)
    # The head's motion goes on across sentences: each render starts where the last ended.
    renders = [c for c in result.calls if c.stage == "video"]
    assert [c.outcome for c in renders] == ["ok"] * 3


@pytest.mark.slow
def test_a_voice_is_registered_once_and_used_by_id(chat_host, llm, tmp_path, broker_events):
    from test_cosyvoice import PROMPT, PROMPT_TEXT

    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(PROMPT)
    config = config_for(llm, tts={"model": "cosyvoice", "register": {
        "voice_id": "chat-voice", "prompt_audio": str(prompt), "prompt_text": PROMPT_TEXT}})
    sink = RecordingSink()
    with Chat(config, endpoint=chat_host.endpoint, sink=sink) as chat:
        first = chat.turn(text="One.")
        second = chat.turn(text="Two.")
    assert first.outcome == second.outcome == "done", first.errors + second.errors
    assert {i[4].sample_rate for i in sink.items} == {24000}  # float32 chunks, converted
    broker_events.wait(lambda items: len([e for e in items if e["daemon"] == "cosyvoice"
                                          and e["method"] == "tts"]) == 6, what="six tts")
    methods = [e["method"] for e in broker_events.find(lambda e: e["daemon"] == "cosyvoice")]
    assert methods.count("register_voice") == 1 and methods.index("register_voice") == 0
    with modelhost.Client(chat_host.endpoint) as client:
        voices = client.call("cosyvoice", "voices")
    assert "chat-voice" in json.dumps(voices)


@pytest.mark.slow
def test_espeak_cannot_register_a_voice_and_says_what_to_do_instead(chat_host, llm, tmp_path):
    config = config_for(llm, tts={"model": "espeak", "register": {
        "voice_id": "x", "prompt_audio": str(tmp_path / "x.wav"), "prompt_text": "x"}})
    with pytest.raises(ChatConfigError, match="has no register_voice operation .*chat.tts.voice"):
        Chat(config, endpoint=chat_host.endpoint)
    with pytest.raises(ChatConfigError, match="no daemon 'nope'"):
        Chat(config_for(llm, tts={"model": "nope"}), endpoint=chat_host.endpoint)


@pytest.mark.slow
def test_load_is_asked_at_the_turn_start_before_any_sentence(chat_host, tmp_path,
                                                             broker_events):
    with modelhost.Client(chat_host.endpoint) as client:
        client.unload("gated_tts")
    chat_host.wait_for(lambda s: next(d for d in s["daemons"] if d["name"] == "gated_tts")[
        "tier"] == "unloaded", what="gated_tts unloaded")
    broker_events.clear()
    with OpenAITestServer(reply="Loaded already.", hold_after=0) as server:
        config = config_for(server, tts={"model": "gated_tts"})
        with Chat(config, endpoint=chat_host.endpoint, sink=RecordingSink()) as chat:
            future = chat.submit(text="Hi.")
            assert server.holding.wait(60)  # no token yet, so no sentence and no TTS call
            broker_events.wait(lambda items: any(e["daemon"] == "gated_tts" and e["method"]
                                                 == "load" for e in items), what="the load")
            row = chat_host.daemon("gated_tts")
            assert row["tier"] == "resident"
            server.release()
            result = future.result(60)
    assert result.outcome == "done", result.errors
    load = broker_events.find(lambda e: e["daemon"] == "gated_tts" and e["method"] == "load")
    assert load[0]["priority"] == "interactive" and load[0]["outcome"] == "ok"
    tts = broker_events.find(lambda e: e["daemon"] == "gated_tts" and e["method"] == "tts")
    assert broker_events.items.index(load[0]) < broker_events.items.index(tts[0])


@pytest.mark.slow
def test_the_microphone_path_speech_is_heard_and_barges_in(chat_host, tmp_path):
    """A recording played as a microphone: silence, a question, silence. Speech starting
    while a turn runs interrupts it; its end makes the next turn."""
    with modelhost.Client(chat_host.endpoint) as client:
        said = client.call("espeak", "tts", text="two three four five six", voice="en-us",
                           rate=150)
    rate = said["sample_rate"]
    silence = b"\0\0" * int(rate * 1.0)
    speech = bytes(said["audio"])
    sink = RecordingSink()
    with OpenAITestServer(reply="You counted. Well done.", hold_after=3) as server:
        with Chat(config_for(server), endpoint=chat_host.endpoint, sink=sink) as chat:
            held = chat.submit(text="Start talking.")
            assert server.holding.wait(60)
            server.hold(None)
            frames = chat_io.frames_of(silence + speech + silence, rate)
            results = chat.listen(frames, sample_rate=rate).result(120)
            first = held.result(60)
    assert first.outcome == "interrupted"
    assert len(results) == 1 and results[0].source == "mic"
    heard = results[0]
    assert heard.transcript.split()[:3] == ["two", "three", "four"], heard.transcript
    assert heard.outcome == "done" and heard.metrics["transcript_s"] >= 0
    assert server.requests[-1]["body"]["messages"][-1]["content"] == heard.transcript


@pytest.mark.slow
def test_modelhost_chat_on_the_command_line(chat_host, llm, tmp_path):
    out = tmp_path / "out"
    base = [sys.executable, "-m", "modelhost", "chat", "--endpoint", chat_host.endpoint,
            "--out", str(out), "--voice", "en-us"]
    run = subprocess.run(base + ["--text", "Hello?", "--json", "--llm-url", llm.url,
                                 "--llm-model", "test-model"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    turn = lines[-1]
    assert turn["outcome"] == "done" and turn["transcript"] == "Hello?"
    for key in ("transcript_s", "first_token_s", "first_audio_s", "first_video_s", "total_s"):
        assert key in turn["metrics"]
    assert Path(turn["files"]["wav"]).exists() and turn["files"]["wav"].startswith(str(out))
    # Typed lines, one turn each (not a terminal: one after another); no model: echo.
    run = subprocess.run(base + ["--input", "-"], input="first line\nsecond line\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("no language model configured") == 1
    assert "You said: first line" in run.stdout and "You said: second line" in run.stdout
    assert "first audio" in run.stdout
    assert (out / "turn-001.wav").exists() and (out / "turn-002.wav").exists()
    # A WAV file as input; the configuration from a file.
    with modelhost.Client(chat_host.endpoint) as client:
        said = client.call("espeak", "tts", text="two three four", voice="en-us", rate=150)
    wav = tmp_path / "in.wav"
    wav.write_bytes(chat_io.wav_bytes(said["audio"], said["sample_rate"]))
    config = tmp_path / "chat.yaml"
    config.write_text("chat:\n  llm: {{url: '{}', model: test-model}}\n  tts: {{voice: en-us}}\n"
                      .format(llm.url))
    run = subprocess.run(base + ["--input", str(wav), "--config", str(config), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    turn = json.loads(run.stdout.splitlines()[-1])
    assert turn["source"] == "wav" and "two" in turn["transcript"]
    assert turn["metrics"]["transcript_s"] > 0
    # No microphone here (no PortAudio, or no input device): said plainly.
    run = subprocess.run(base + ["--mic"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout
    assert "sounddevice" in run.stderr or "no microphone here" in run.stderr, run.stderr
