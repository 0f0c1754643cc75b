"""The OpenAI-compatible gateway (modelhost.gateway), through the official `openai` client
and curl, against a real `modelhost up` that starts the gateway as its child.

End to end, speech comes from the real espeak-ng engine and transcripts from the
real PocketSphinx engine (the embedded default's two engines, on the host
interpreter), so `whisper-1` transcribes speech that `tts-1` made. What needs
control over timing uses a TTS STAND-IN (tests/engines/gateway_standin_engine.py:
espeak's `tts` signature and chunks) whose calls wait at gates the test opens:
that is how a test shows that the first bytes leave before the synthesis
ends, and that a client that goes away cancels its call, without timing
anything. Cancellation is read from the broker's `request` events.
"""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
numpy = pytest.importorskip("numpy")
soundfile = pytest.importorskip("soundfile")

from modelhost.broker.config import ConfigError, gateway_spec, parse_config  # noqa: E402
from modelhost.gateway import Settings, default_models  # noqa: E402
from modelhost.gateway import _audio  # noqa: E402
from modelhost.gateway._app import _transcript  # noqa: E402

from conftest import Host, daemon_yaml, pid_alive  # noqa: E402

DIGITS = "two three four five six"
HEARD = ["two", "three", "four", "five"]  # what pocketsphinx hears of DIGITS (see test_asr)
KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
STANDIN = "gateway_standin_engine:GatewayStandInEngine"
ESPEAK = "modelhost.daemons.espeak.engine:EspeakEngine"
ASR = "modelhost.daemons.asr.pocketsphinx_engine:PocketsphinxEngine"
CHUNK_BYTES = 2 * int(22050 * 0.1)  # one stand-in chunk


# --- configuration -------------------------------------------------------------------

BASE = "daemons:\n  espeak: {engine: a.b:C, python: \"3.12\"}\n  asr: {engine: a.b:D, python: " \
       "\"3.12\"}\n"


def test_a_gateway_section_takes_defaults_and_a_mapping():
    config = parse_config(BASE + "gateway:\n")
    assert config.gateway.host == "127.0.0.1" and config.gateway.port == 8000
    assert config.gateway.models is None and config.gateway.api_keys == ()
    assert parse_config(BASE).gateway is None
    config = parse_config(BASE + """gateway:
  listen: "[::1]:9000"
  timeout_s: 30
  max_upload: 2MiB
  pcm_rate: null
  models:
    tts-1: {daemon: espeak, task: speech, voices: {alloy: en-gb}, timeout_s: 5,
            speed: {argument: rate, scale: 175, min: 80, max: 450}}
    whisper-1: {daemon: asr, task: transcription, arguments: {language: en}}
""")
    gateway = config.gateway
    assert (gateway.host, gateway.port, gateway.timeout_s) == ("::1", 9000, 30.0)
    assert gateway.max_upload_bytes == 2 * 2**20 and gateway.pcm_rate is None
    tts = gateway.models["tts-1"]
    assert (tts.daemon, tts.task, tts.voices, tts.timeout_s) == ("espeak", "speech",
                                                                 {"alloy": "en-gb"}, 5.0)
    assert tts.speed == {"argument": "rate", "scale": 175, "min": 80, "max": 450}
    assert gateway.models["whisper-1"].arguments == {"language": "en"}


def errors_of(text):
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.errors


def test_gateway_errors_name_the_line_and_key():
    problems = errors_of(BASE + """gateway:
  listen: 127.0.0.1:99999
  colour: blue
  models:
    tts-1: {daemon: espeek, task: speech}
    whisper-1: {daemon: asr, task: listening}
    x: {task: speech}
""")
    text = "\n".join(problems)
    assert "<string>:5: gateway.listen: expected HOST:PORT" in text
    assert "<string>:6: gateway.colour: unknown key" in text
    assert ("<string>:8: gateway.models.tts-1.daemon: no daemon named 'espeek' in this "
            "configuration (known: espeak, asr); did you mean 'espeak'?") in text
    assert "<string>:9: gateway.models.whisper-1.task: expected one of speech, transcription" \
        in text
    assert "<string>:10: gateway.models.x.daemon: required key is missing" in text


def test_beyond_loopback_needs_keys_at_config_load(monkeypatch, tmp_path):
    problems = errors_of(BASE + "gateway:\n  listen: 0.0.0.0:8000\n")
    assert len(problems) == 1 and "<string>:5: gateway.listen: '0.0.0.0' is not a loopback " \
        "address: a gateway reachable from other hosts needs API keys" in problems[0]
    config = parse_config(BASE + "gateway:\n  listen: 0.0.0.0:8000\n  api_keys: [{}]\n".format(
        KEY))
    assert config.gateway.api_keys == (KEY,)
    # A key file: owner-only, one key a line, comments.
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\n{}\n\n{}\n".format(KEY, OTHER_KEY))
    keys.chmod(0o644)
    text = BASE + "gateway:\n  listen: 0.0.0.0:8000\n  api_keys_file: {}\n".format(keys)
    assert "chmod 600" in errors_of(text)[0]
    keys.chmod(0o600)
    assert parse_config(text).gateway.api_keys == (KEY, OTHER_KEY)
    # An environment variable: keys separated by commas or spaces.
    text = BASE + "gateway:\n  listen: 0.0.0.0:8000\n  api_keys_env: MH_TEST_KEYS\n"
    monkeypatch.delenv("MH_TEST_KEYS", raising=False)
    assert "$MH_TEST_KEYS is not set or empty" in errors_of(text)[0]
    monkeypatch.setenv("MH_TEST_KEYS", "{}, {}".format(KEY, OTHER_KEY))
    assert parse_config(text).gateway.api_keys == (KEY, OTHER_KEY)
    # Short keys are refused, and the message never shows the key itself.
    problems = errors_of(BASE + "gateway:\n  api_keys: [short-key]\n")
    assert "at least 16 characters" in problems[0] and "short-key" not in problems[0]
    # --listen beyond loopback without keys is refused the same way.
    with pytest.raises(ConfigError, match="not a loopback address"):
        gateway_spec(parse_config(BASE), listen="0.0.0.0:8000")
    assert gateway_spec(parse_config(BASE), listen="127.0.0.1:0")["port"] == 0


def test_a_daemon_may_not_be_named_gateway_beside_a_gateway_section():
    text = "daemons:\n  gateway: {engine: a.b:C, python: \"3.12\"}\n"
    assert parse_config(text).daemons["gateway"]
    problems = errors_of(text + "gateway:\n")
    assert problems == ["<string>:2: daemons.gateway: the name 'gateway' is the gateway's "
                        "(section at line 3); rename the daemon"]


def test_the_embedded_default_maps_openai_names_to_espeak_and_asr():
    spec = gateway_spec(parse_config(BASE.replace("a.b:C", ESPEAK)))
    settings = Settings.from_spec(spec)
    assert {name: route.daemon for name, route in settings.routes.items()} == {
        "tts-1": "espeak", "tts-1-hd": "espeak", "gpt-4o-mini-tts": "espeak",
        "whisper-1": "asr", "gpt-4o-transcribe": "asr", "gpt-4o-mini-transcribe": "asr"}
    tts = settings.route("tts-1")
    assert (tts.method, tts.voice("alloy"), tts.voice("en-gb")) == ("tts", "en-us", "en-gb")
    # speed 1.0 is espeak's 175 words a minute; the range is clamped to espeak's.
    assert [tts.speed.value(s) for s in (1.0, 1.5, 0.25, 4.0)] == [175, 262, 80, 450]
    assert settings.route("espeak") is tts  # a daemon's own name: its first model
    assert settings.route("whisper-1").method == "transcribe"
    assert default_models({"cosy": {"engine": "modelhost.daemons.cosyvoice.engine:"
                                              "CosyVoiceEngine"}})["tts-1"]["daemon"] == "cosy"
    assert default_models({"other": {"engine": "x:Y"}}) == {}


# --- audio formats --------------------------------------------------------------------

def tone_pcm(seconds, rate=22050, frequency=440.0):
    t = numpy.arange(int(seconds * rate)) / float(rate)
    return (0.3 * numpy.sin(2 * numpy.pi * frequency * t) * 32767).astype("<i2").tobytes()


def encode(kind, chunks, rate=22050):
    encoder = _audio.encoder_for(kind, 24000)
    parts = [encoder.start(rate, 1)]
    for chunk in chunks:
        parts.append(encoder.feed(chunk))
    parts.append(encoder.finish())
    return encoder, parts


def test_wav_streams_with_its_sizes_at_the_streaming_maximum():
    chunks = [tone_pcm(0.25) for _ in range(4)]
    _, parts = encode("wav", chunks)
    assert parts[0][4:8] == b"\xff\xff\xff\xff" and parts[0][40:44] == b"\xff\xff\xff\xff"
    assert parts[1:5] == chunks  # each chunk leaves as it comes
    data = b"".join(parts)
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (22050, 1)
        assert wav.readframes(10**9) == b"".join(chunks)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    assert rate == 22050 and len(samples) == 4 * len(chunks[0]) // 2


def test_pcm_is_resampled_to_openais_24khz_chunk_by_chunk():
    chunks = [tone_pcm(0.25) for _ in range(4)]
    _, parts = encode("pcm", chunks)
    assert all(parts[1:5])  # output before the end
    total = sum(len(p) for p in parts) // 2
    assert abs(total - 24000) <= 2  # 1 s of audio at 24 kHz
    samples = numpy.frombuffer(b"".join(parts), dtype="<i2").astype(float)
    spectrum = numpy.abs(numpy.fft.rfft(samples))
    assert abs(numpy.argmax(spectrum) * 24000 / len(samples) - 440) < 2


@pytest.mark.parametrize("kind", ["mp3", "opus"])
def test_mp3_and_opus_stream_and_read_back(kind):
    chunks = [tone_pcm(0.25) for _ in range(12)]
    encoder, parts = encode(kind, chunks)
    assert encoder.streams
    assert sum(1 for p in parts[:-1] if p) >= 2  # bytes before the end, in more than one piece
    samples, rate = soundfile.read(io.BytesIO(b"".join(parts)), dtype="float32")
    assert rate == (22050 if kind == "mp3" else 24000)
    assert abs(len(samples) / float(rate) - 3.0) < 0.2  # 3 s, give or take codec padding


def test_flac_is_encoded_after_and_reads_back_exactly():
    chunks = [tone_pcm(0.25) for _ in range(4)]
    encoder, parts = encode("flac", chunks)
    assert not encoder.streams and not any(parts[:-1])
    samples, rate = soundfile.read(io.BytesIO(parts[-1]), dtype="int16")
    assert rate == 22050 and samples.astype("<i2").tobytes() == b"".join(chunks)


def test_float_chunks_of_cosyvoice_become_pcm16():
    floats = numpy.array([0.0, 0.5, -1.0, 2.0], dtype=numpy.float32)
    pcm, rate, channels = _audio.pcm16_of({"audio": floats, "sample_rate": 24000})
    assert (rate, channels) == (24000, 1)
    assert list(numpy.frombuffer(pcm, dtype="<i2")) == [0, 16384, -32767, 32767]
    pcm, _, _ = _audio.pcm16_of({"audio": floats.tobytes(), "sample_rate": 24000,
                                 "format": "float32"})
    assert list(numpy.frombuffer(pcm, dtype="<i2")) == [0, 16384, -32767, 32767]


def test_transcripts_in_each_format():
    result = {"text": "two three", "language": "en", "duration_s": 1.5,
              "segments": [{"start": 0.05, "end": 1.25, "text": "two three"}],
              "words": [{"start": 0.05, "end": 0.5, "word": "two"},
                        {"start": 0.5, "end": 1.25, "word": "three"}]}
    assert _transcript(result, "text", {"segment"}) == (b"two three\n",
                                                       "text/plain; charset=utf-8")
    assert json.loads(_transcript(result, "json", {"segment"})[0])["text"] == "two three"
    verbose = json.loads(_transcript(result, "verbose_json", {"segment"})[0])
    assert verbose["segments"][0]["end"] == 1.25 and "words" not in verbose
    verbose = json.loads(_transcript(result, "verbose_json", {"word"})[0])
    assert [w["word"] for w in verbose["words"]] == ["two", "three"] and "segments" not in verbose
    assert _transcript(result, "srt", {"segment"})[0].decode() == \
        "1\n00:00:00,050 --> 00:00:01,250\ntwo three\n\n"
    assert _transcript(result, "vtt", {"segment"})[0].decode() == \
        "WEBVTT\n\n00:00:00.050 --> 00:00:01.250\ntwo three\n\n"


# --- end to end -------------------------------------------------------------------------

def gateway_url(host, timeout=60.0, old_pid=None):
    path = host.runtime / "gateway-address.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            address = json.loads(path.read_text())
            if address["pid"] != old_pid:
                return address["url"], address["pid"]
        except (OSError, ValueError, KeyError):
            pass
        if host.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError("no gateway address in {}:\n{}".format(path, host.log()[-6000:]))


class Gates(object):
    """The stand-in's gates and event log."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def open(self, name):
        (self.dir / name).write_text("open")

    def events(self):
        path = self.dir / "events.log"
        return path.read_text().splitlines() if path.exists() else []

    def wait_for(self, line, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.events():
                return
            time.sleep(0.01)
        raise AssertionError("the stand-in never logged {!r}: {}".format(line, self.events()))


def standin(name, gates, **settings):
    options = "{{gate_dir: {}{}}}".format(json.dumps(str(gates.dir)), "".join(
        ", {}: {}".format(k, v) for k, v in settings.pop("options", {}).items()))
    return daemon_yaml(name, engine=STANDIN, options=options, **settings)


GATEWAY_SECTION = """gateway:
  listen: 127.0.0.1:0
  max_upload: 1MiB
  max_input_chars: 1000
  models:
    tts-1: {daemon: espeak, task: speech}
    whisper-1: {daemon: asr, task: transcription}
    gated: {daemon: gated, task: speech, voices: {alloy: standin-a}}
    gated-short: {daemon: gated, task: speech, timeout_s: 1}
    gated-asr: {daemon: gated, task: transcription}
    queued: {daemon: queued, task: speech}
    huge: {daemon: huge, task: speech}
    broken: {daemon: broken, task: speech}
"""


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    return Gates(tmp_path_factory.mktemp("gates"))


@pytest.fixture(scope="module")
def gw(gates):
    """A `modelhost up` with espeak, asr, the stand-ins and a gateway; (host, url)."""
    host = Host([
        daemon_yaml("espeak", engine=ESPEAK, options="{voice: en-us}"),
        daemon_yaml("asr", engine=ASR, concurrency=2),
        standin("gated", gates, concurrency=4),
        standin("queued", gates, concurrency=1, max_queue=1),
        standin("huge", gates, memory="{resident: 100GiB}", preload="false"),
        standin("broken", gates, options={"fail_load": "true"}),
    ])
    host.config.write_text(host.config.read_text() + GATEWAY_SECTION)
    host.start()
    try:
        host.wait_ready("espeak", "asr", "gated", "queued", timeout=90)
        host.url, host.gateway_pid = gateway_url(host)
        yield host
        # The gateway logged no exception (the one traceback is the broken daemon's load).
        lines = host.log().splitlines()
        unexpected = [lines[i - 1] for i, line in enumerate(lines) if line.startswith(
            "Traceback") and "daemon=broken load failed" not in lines[i - 1]]
        assert not unexpected and not any("ASGI" in line or "ERROR gateway" in line
                                          for line in lines), "\n".join(lines[-200:])
    finally:
        host.stop()


def api(host, **options):
    options.setdefault("max_retries", 0)
    options.setdefault("timeout", 60.0)
    return openai.OpenAI(base_url=host.url + "/v1", api_key=options.pop("api_key", "unused"),
                         **options)


class Events(object):
    """The broker's `request` events, read in a thread from before the action on."""

    def __init__(self, host):
        self.client = host.client()
        self.seen = []
        self._iterator = self.client.events(kinds=["request"], timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.2)  # the subscription connects (ZeroMQ's slow joiner)

    def _read(self):
        try:
            for event in self._iterator:
                self.seen.append(event)
        except Exception:
            pass

    def wait(self, daemon, outcome, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.seen):
                if event.get("daemon") == daemon and event.get("outcome") == outcome:
                    return event
            time.sleep(0.02)
        raise AssertionError("no request event of {} with outcome {}; seen: {}".format(
            daemon, outcome, self.seen))


def small_wav():
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(tone_pcm(0.2, 16000))
    return out.getvalue()


def wav_of(data):
    with wave.open(io.BytesIO(data)) as wav:
        return wav.getframerate(), wav.getnchannels(), wav.readframes(10**9)


@pytest.mark.slow
def test_speech_whole_in_every_format(gw):
    client = api(gw)
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the "
                                        "gateway.", response_format="wav")
    rate, channels, pcm = wav_of(speech.content)
    assert (rate, channels) == (22050, 1) and len(pcm) > 22050  # over half a second of speech
    assert speech.response.headers["content-type"] == "audio/wav"
    direct = gw.client().call("espeak", "tts", text="Hello from the gateway.", voice="en-us")
    # espeak jitters by a few samples between two syntheses of one text.
    assert abs(len(pcm) - len(direct["audio"])) < 0.05 * len(pcm)
    for kind, reader_rate in (("mp3", 22050), ("opus", 24000), ("flac", 22050)):
        data = client.audio.speech.create(model="tts-1", voice="nova", input="Hello again.",
                                          response_format=kind).content
        samples, got_rate = soundfile.read(io.BytesIO(data), dtype="float32")
        assert got_rate == reader_rate and len(samples) > 0.5 * got_rate, kind
        assert numpy.abs(samples).max() > 0.05, kind  # speech, not silence
    pcm24 = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello again.",
                                       response_format="pcm")
    assert pcm24.response.headers["x-sample-rate"] == "24000"
    assert len(pcm24.content) % 2 == 0 and len(pcm24.content) > 24000
    # The default format is mp3, as OpenAI's; a daemon voice name passes through.
    speech = client.audio.speech.create(model="tts-1", voice="en-gb", input="Cheerio.")
    assert speech.response.headers["content-type"] == "audio/mpeg"
    assert soundfile.read(io.BytesIO(speech.content))[1] == 22050
    # speed 2 is twice espeak's rate: clearly shorter speech.
    slow = wav_of(client.audio.speech.create(model="tts-1", voice="alloy", input=DIGITS,
                                             response_format="wav").content)[2]
    fast = wav_of(client.audio.speech.create(model="tts-1", voice="alloy", input=DIGITS,
                                             response_format="wav", speed=2.0).content)[2]
    assert len(fast) < 0.7 * len(slow)


@pytest.mark.slow
def test_the_first_chunk_arrives_while_the_synthesis_is_held(gw, gates):
    client = api(gw)
    released = []

    def watchdog():  # only so that a buffering gateway fails the test instead of hanging it
        time.sleep(30)
        released.append(True)
        gates.open("first-held")

    threading.Thread(target=watchdog, daemon=True).start()
    with client.audio.speech.with_streaming_response.create(
            model="gated", voice="alloy", input="wait-after:first-held hello",
            response_format="wav") as response:
        assert response.headers["content-type"] == "audio/wav"
        pieces = response.iter_bytes()
        received = b""
        while len(received) < 44 + CHUNK_BYTES:
            received += next(pieces)
        # The header and the whole first chunk are here; the stand-in still waits at
        # its gate, so its call has not ended.
        assert not released
        # The stand-in sends its chunk, then notes that it waits at the gate: the note
        # may come a moment after the chunk has reached us.
        deadline = time.monotonic() + 20
        while "waiting first-held" not in gates.events() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "waiting first-held" in gates.events()
        assert not any(line.startswith("end") for line in gates.events()
                       [gates.events().index("start wait-after:first-held hello"):])
        gates.open("first-held")
        for piece in pieces:
            received += piece
    assert not released
    rate, channels, pcm = wav_of(received)
    assert (rate, channels, len(pcm)) == (22050, 1, 4 * CHUNK_BYTES)


@pytest.mark.slow
def test_sse_gives_deltas_then_done(gw, gates):
    client = api(gw)
    with client.audio.speech.with_streaming_response.create(
            model="gated", voice="alloy", input="wait-after:sse-held hello",
            response_format="pcm", stream_format="sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                break
        assert events[0]["type"] == "speech.audio.delta"  # before the gate opens
        gates.open("sse-held")
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    # 0.4 s of the stand-in's audio at 24 kHz.
    assert abs(len(pcm) // 2 - 9600) <= 2


@pytest.mark.slow
def test_curl_no_buffer_gets_the_first_bytes_before_the_end(gw, gates):
    body = json.dumps({"model": "gated", "voice": "alloy", "input": "wait-after:curl-held hi",
                       "response_format": "pcm"})
    curl = subprocess.Popen(["curl", "--no-buffer", "-sS", "--fail-with-body", "-X", "POST",
                             gw.url + "/v1/audio/speech", "-H",
                             "Content-Type: application/json", "-d", body, "-o", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = os.read(curl.stdout.fileno(), 1 << 16)
        assert first and "waiting curl-held" in gates.events()
        assert curl.poll() is None  # still streaming
        gates.open("curl-held")
        rest = curl.stdout.read()
        assert curl.wait(30) == 0, curl.stderr.read()
    finally:
        if curl.poll() is None:
            curl.kill()
    assert abs((len(first) + len(rest)) // 2 - 9600) <= 2  # 0.4 s at 24 kHz
    # SSE through curl too.
    out = subprocess.run(["curl", "--no-buffer", "-sS", "-X", "POST", gw.url + "/v1/audio/speech",
                          "-H", "Content-Type: application/json", "-d", json.dumps(
                              {"model": "tts-1", "voice": "alloy", "input": "Hello.",
                               "stream_format": "sse", "response_format": "wav"})],
                         capture_output=True, text=True, timeout=60)
    data = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert data[0]["type"] == "speech.audio.delta" and data[-1]["type"] == "speech.audio.done"
    wav = b"".join(base64.b64decode(e["audio"]) for e in data[:-1])
    assert wav_of(wav)[0] == 22050


@pytest.mark.slow
def test_transcription_of_speech_the_tts_daemon_made(gw):
    client = api(gw)
    speech = client.audio.speech.create(model="tts-1", voice="alloy", input=DIGITS,
                                        response_format="wav", speed=150 / 175.0).content
    text = client.audio.transcriptions.create(model="whisper-1", file=("digits.wav", speech))
    assert all(word in text.text.split() for word in HEARD), text
    plain = client.audio.transcriptions.create(model="whisper-1", file=("digits.wav", speech),
                                               response_format="text")
    assert all(word in plain.split() for word in HEARD), plain
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=("digits.wav", speech), response_format="verbose_json",
        timestamp_granularities=["word", "segment"], language="en")
    assert [w.word for w in verbose.words][:4] == HEARD
    assert verbose.segments and verbose.segments[0].end > verbose.segments[0].start
    assert 1.0 < verbose.duration < 4.0 and verbose.language == "en"
    assert all(w.start < w.end for w in verbose.words)
    # Another container: FLAC from the gateway itself (encoded whole), decoded by the gateway.
    flac = client.audio.speech.create(model="tts-1", voice="alloy", input=DIGITS,
                                      response_format="flac", speed=150 / 175.0).content
    text = client.audio.transcriptions.create(model="whisper-1", file=("digits.flac", flac))
    assert all(word in text.text.split() for word in HEARD), text
    srt = client.audio.transcriptions.create(model="whisper-1", file=("d.wav", speech),
                                             response_format="srt")
    assert srt.startswith("1\n00:00:") and "-->" in srt


@pytest.mark.slow
def test_models_and_voices_list_the_daemons_and_their_state(gw):
    client = api(gw)
    models = {model.id: model for model in client.models.list()}
    assert {"tts-1", "whisper-1", "gated", "espeak", "asr"} <= set(models)
    tts = models["tts-1"].model_dump()
    assert (tts["object"], tts["owned_by"], tts["daemon"], tts["task"]) == (
        "model", "modelhost", "espeak", "speech")
    assert tts["state"] in ("ready", "busy") and tts["tier"] == "resident"
    assert models["whisper-1"].model_dump()["task"] == "transcription"
    assert models["broken"].model_dump()["state"] == "failed"
    assert client.models.retrieve("whisper-1").model_dump()["daemon"] == "asr"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    voices = client.get("/audio/voices", cast_to=object, options={"params": {"model": "tts-1"}})
    mapped = {v["id"]: v["voice"] for v in voices["data"] if v["model"] == "tts-1"}
    assert mapped["alloy"] == "en-us" and len(mapped) == 13
    own = {v["id"] for v in voices["data"] if v["model"] is None}
    assert {"en-us", "en-gb", "de"} <= own
    voices = client.get("/audio/voices", cast_to=object, options={"params": {"model": "gated"}})
    assert {v["id"] for v in voices["data"]} == {"alloy", "standin-a", "standin-b"}


def status_of(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return caught.value.status_code, error


@pytest.mark.slow
def test_each_error_has_its_status_in_the_openai_shape(gw, gates):
    client = api(gw)
    speak = client.audio.speech.create
    status, error = status_of(lambda: speak(model="nope", voice="alloy", input="x"))
    assert (status, error["code"], error["param"]) == (404, "model_not_found", "model")
    status, error = status_of(lambda: speak(model="tts-1", voice="zzz", input="x"))
    assert status == 400 and "unknown voice 'zzz'" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert status_of(lambda: speak(model="tts-1", voice="alloy", input="x",
                                   response_format="aac"))[0] == 400
    assert status_of(lambda: speak(model="tts-1", voice="alloy", input="x", speed=5))[0] == 400
    assert status_of(lambda: speak(model="tts-1", voice="alloy", input="x" * 1001))[0] == 400
    assert status_of(lambda: speak(model="whisper-1", voice="alloy", input="x"))[0] == 400
    # 413: an upload over max_upload (1 MiB here).
    big = b"RIFF" + b"\x00" * (2 * 2**20)
    status, error = status_of(lambda: client.audio.transcriptions.create(
        model="whisper-1", file=("big.wav", big)))
    assert (status, error["code"]) == (413, "payload_too_large")
    # 400 for what the recognizer cannot read.
    assert status_of(lambda: client.audio.transcriptions.create(
        model="whisper-1", file=("x.wav", b"RIFF1234WAVEnonsense")))[0] == 400
    # 503: a daemon that failed its load, and one that can never fit its memory.
    status, error = status_of(lambda: speak(model="broken", voice="x", input="x"))
    assert (status, error["code"]) == (503, "daemon_unavailable")
    status, error = status_of(lambda: speak(model="huge", voice="x", input="x"))
    assert (status, error["code"]) == (503, "insufficient_memory")
    # 504: the model's timeout_s (1 s) passes while the stand-in waits at a gate.
    status, error = status_of(lambda: speak(model="gated-short", voice="standin-a",
                                            input="wait-before:never x"))
    assert (status, error["code"]) == (504, "timeout")
    # 429: `queued` runs one call and queues one (max_queue 1); a third is over capacity.
    threads = [threading.Thread(target=lambda: speak(model="queued", voice="standin-a",
                                                     input="wait-before:queue-open x"))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        gw.wait_for(lambda s: any(d["name"] == "queued" and d["running"] == 1 and d["queued"] == 1
                                  for d in s["daemons"]), 30, "a running and a queued call")
        status, error = status_of(lambda: speak(model="queued", voice="standin-a", input="x"))
        assert (status, error["type"], error["code"]) == (429, "rate_limit_error",
                                                          "over_capacity")
    finally:
        gates.open("queue-open")
        for thread in threads:
            thread.join(30)
    # A route the gateway does not serve, in the same shape.
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(gw.url + "/v1/chat/completions")
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"


@pytest.mark.slow
def test_a_client_that_goes_away_cancels_its_call(gw, gates):
    client = api(gw)
    # Streaming: the client leaves after the first chunk, while the synthesis is held.
    events = Events(gw)
    with client.audio.speech.with_streaming_response.create(
            model="gated", voice="alloy", input="wait-after:left-mid hello",
            response_format="wav") as response:
        next(response.iter_bytes())
        gates.wait_for("waiting left-mid")
    # Closed with its body unread: httpx drops the connection.
    event = events.wait("gated", "cancelled")
    assert event["method"] == "tts"
    gates.wait_for("end cancelled")
    # Before the first chunk (the gateway's wait for it): a client that times out.
    events = Events(gw)
    before = len(gates.events())
    with pytest.raises(openai.APITimeoutError):
        api(gw, timeout=1.0).audio.speech.create(model="gated", voice="alloy",
                                                 input="wait-before:left-early hello")
    events.wait("gated", "cancelled")
    assert "end cancelled" in gates.events()[before:]
    # A transcription's wait for its result.
    events = Events(gw)
    before = len(gates.events())
    with pytest.raises(openai.APITimeoutError):
        api(gw, timeout=1.0).audio.transcriptions.create(
            model="gated-asr", file=("x.wav", small_wav()), language="wait:left-asr")
    event = events.wait("gated", "cancelled")
    assert event["method"] == "transcribe"
    assert "end cancelled" in gates.events()[before:]
    # Nothing left running.
    gw.wait_for(lambda s: all(d["running"] == 0 for d in s["daemons"]), 10, "no running calls")


@pytest.mark.slow
def test_the_supervisor_restarts_a_killed_gateway_and_stops_it(gw):
    os.kill(gw.gateway_pid, signal.SIGKILL)
    url, pid = gateway_url(gw, old_pid=gw.gateway_pid)
    assert pid != gw.gateway_pid
    gw.url, gw.gateway_pid = url, pid
    assert api(gw).models.retrieve("tts-1").id == "tts-1"
    assert "daemon=gateway ready after" in gw.log()
    logs = subprocess.run([sys.executable, "-m", "modelhost", "logs", "gateway", "--config",
                           str(gw.config), "-n", "200"], capture_output=True, text=True,
                          timeout=30)
    assert "listening on http://127.0.0.1:" in logs.stdout


def test_modelhost_up_stops_its_gateway(make_host, tmp_path):
    host = make_host([standin("gated", Gates(tmp_path))])
    host.config.write_text(host.config.read_text() + "gateway:\n  listen: 127.0.0.1:0\n")
    host.start()
    _, pid = gateway_url(host)
    host.stop()
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, monkeypatch_module):
    gates = Gates(tmp_path_factory.mktemp("keyed-gates"))
    monkeypatch_module.setenv("MH_GATEWAY_TEST_KEYS", OTHER_KEY)
    host = Host([standin("gated", gates)])
    host.config.write_text(host.config.read_text() + """gateway:
  listen: 127.0.0.1:0
  api_keys: [{}]
  api_keys_env: MH_GATEWAY_TEST_KEYS
  models:
    tts-1: {{daemon: gated, task: speech}}
""".format(KEY))
    host.start()
    try:
        host.wait_ready("gated")
        host.url, _ = gateway_url(host)
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_api_keys_are_required_when_configured(keyed):
    speak = dict(model="tts-1", voice="standin-a", input="hello", response_format="wav")
    with pytest.raises(openai.AuthenticationError) as caught:
        api(keyed, api_key="wrong-key-0123456789").audio.speech.create(**speak)
    assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
    assert caught.value.response.headers["www-authenticate"] == "Bearer"
    for key in (KEY, OTHER_KEY):  # from the list and from the environment
        data = api(keyed, api_key=key).audio.speech.create(**speak).content
        assert wav_of(data)[2] == b"".join(_tone_chunks())
    with pytest.raises(urllib.error.HTTPError) as caught:  # no Authorization at all
        urllib.request.urlopen(keyed.url + "/v1/models")
    assert caught.value.code == 401
    assert json.loads(caught.value.read())["error"]["code"] == "missing_api_key"
    with urllib.request.urlopen(keyed.url + "/health") as response:  # says nothing else
        assert json.loads(response.read()) == {"status": "ok"}


def _tone_chunks():
    sys.path.insert(0, str(Path(__file__).parent / "engines"))
    import gateway_standin_engine as engine

    return [engine._tone(i, int(engine.RATE * engine.CHUNK_S)) for i in range(4)]


def test_modelhost_gateway_runs_in_the_foreground(keyed):
    gateway = subprocess.Popen([sys.executable, "-m", "modelhost", "gateway", "--config",
                                str(keyed.config), "--listen", "127.0.0.1:0"],
                               stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in gateway.stderr:
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split(" ", 1)[0]
                break
        assert url and url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert client.models.retrieve("tts-1").model_dump()["daemon"] == "gated"
        gateway.send_signal(signal.SIGINT)
        assert gateway.wait(30) == 130  # Ctrl-C, as every modelhost command reports it
    finally:
        if gateway.poll() is None:
            gateway.kill()
    # Beyond loopback without keys: refused before anything starts.
    refused = subprocess.run([sys.executable, "-m", "modelhost", "gateway", "--listen",
                              "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not a loopback address" in refused.stderr
