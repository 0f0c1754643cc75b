"""The model verbs of the command line (say, transcribe, tts, text-to-audio, talking-head):
which client call each makes from its arguments, and what it writes and prints, against a
stand-in Client (the end-to-end runs are in the host and model tests)."""

import json
import wave

import numpy
import pytest
import soundfile

from modelhost import _cli_verbs, cli
from modelhost.models import Audio, audio_bytes


class RecordingClient(object):
    """Records each call as (method, positional, keywords); answers from ANSWERS."""

    calls = []
    opened = []
    ANSWERS = {
        "call": {"audio": b"\x01\x00" * 2205, "sample_rate": 22050, "samples": 2205},
        "transcribe": {"text": "two three four", "language": "en", "segments": []},
        "tts": Audio(numpy.zeros(4800, numpy.float32), 24000, {}),
        "text_to_audio": Audio(numpy.zeros((22050, 2), numpy.float32), 44100, {"seed": 7}),
        "talking_head": b"\x00\x00\x00\x18ftypmp42",
    }

    def __init__(self, endpoint=None, **options):
        RecordingClient.opened.append((endpoint, options))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def __getattr__(self, method):
        def record(*positional, **keywords):
            RecordingClient.calls.append((method, positional, keywords))
            return RecordingClient.ANSWERS[method]
        return record


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(_cli_verbs, "Client", RecordingClient)
    RecordingClient.calls, RecordingClient.opened = [], []
    return RecordingClient


def _one_call(client):
    (method, positional, keywords), = client.calls
    progress = keywords.pop("on_progress", None)
    return method, positional, keywords, progress


def test_say_calls_tts_of_espeak_and_writes_the_pcm(client, tmp_path, capsys):
    path = str(tmp_path / "hello.wav")
    assert cli.main(["say", "hello", "-o", path, "--endpoint", "ipc:///e"]) == 0
    assert client.opened == [("ipc:///e", {"timeout": 60.0})]
    assert _one_call(client) == ("call", ("espeak", "tts"), {"arguments": {"text": "hello"}},
                                 None)
    assert capsys.readouterr().out == "wrote {}: 0.10s of speech at 22050 Hz\n".format(path)
    with wave.open(path) as written:
        assert (written.getframerate(), written.getnchannels(), written.getnframes()) == \
            (22050, 1, 2205)


def test_say_passes_a_voice_and_prints_json(client, tmp_path, capsys):
    path = str(tmp_path / "hello.wav")
    assert cli.main(["say", "hello", "--voice", "en-us", "--model", "tts2", "--timeout", "5",
                     "-o", path, "--json", "--endpoint", "ipc:///e"]) == 0
    assert client.opened == [("ipc:///e", {"timeout": 5.0})]
    assert _one_call(client)[1:3] == (("tts2", "tts"),
                                      {"arguments": {"text": "hello", "voice": "en-us"}})
    assert json.loads(capsys.readouterr().out) == {"path": path, "seconds": 0.1,
                                                   "sample_rate": 22050}


def test_transcribe_sends_the_file_and_prints_the_text(client, tmp_path, capsys):
    path = tmp_path / "said.wav"
    path.write_bytes(b"RIFF....WAVE")
    assert cli.main(["transcribe", str(path), "--endpoint", "ipc:///e"]) == 0
    method, positional, keywords, progress = _one_call(client)
    assert (method, keywords) == ("transcribe", {"model": "asr"})
    assert audio_bytes(positional[0]) == b"RIFF....WAVE"  # the file, or its path
    assert isinstance(progress, _cli_verbs.ProgressLine)
    assert client.opened == [("ipc:///e", {"timeout": 600.0})]
    assert capsys.readouterr().out == "two three four\n"
    client.calls = []
    assert cli.main(["transcribe", str(path), "--language", "de", "--json",
                     "--endpoint", "ipc:///e"]) == 0
    assert _one_call(client)[2] == {"model": "asr", "language": "de"}
    assert json.loads(capsys.readouterr().out)["language"] == "en"


def test_transcribe_of_a_missing_file_fails_with_the_reason(client, tmp_path, capsys):
    missing = str(tmp_path / "missing.wav")
    assert cli.main(["transcribe", missing, "--endpoint", "ipc:///e"]) == cli.EXIT_ERROR
    assert "No such file or directory" in capsys.readouterr().err


def test_tts_passes_only_the_options_given(client, tmp_path, capsys):
    path = str(tmp_path / "speech.wav")
    assert cli.main(["tts", "Hello there.", "-o", path, "--endpoint", "ipc:///e"]) == 0
    assert _one_call(client) == ("tts", ("Hello there.",), {"model": "cosyvoice"}, None)
    assert capsys.readouterr().out == "wrote {}: 0.20s of speech at 24000 Hz\n".format(path)
    assert soundfile.info(path).samplerate == 24000
    client.calls = []
    assert cli.main(["tts", "Hi.", "-o", path, "--voice", "narrator", "--mode", "instruct",
                     "--prompt-audio", "p.wav", "--prompt-text", "what p says",
                     "--instruct-text", "slowly", "--speed", "0.8", "--model", "tts",
                     "--timeout", "30", "--endpoint", "ipc:///e"]) == 0
    assert _one_call(client) == ("tts", ("Hi.",), {
        "model": "tts", "voice": "narrator", "mode": "instruct", "prompt_audio": "p.wav",
        "prompt_text": "what p says", "instruct_text": "slowly", "speed": 0.8}, None)
    assert client.opened[-1] == ("ipc:///e", {"timeout": 30.0})


def test_text_to_audio_passes_zero_seeds_and_says_the_seed(client, tmp_path, capsys):
    path = str(tmp_path / "rain.flac")
    assert cli.main(["text-to-audio", "rain on a tin roof", "-o", path, "--seed", "0",
                     "--steps", "6", "--duration", "0.5", "--guidance-scale", "4.5",
                     "--endpoint", "ipc:///e"]) == 0
    method, positional, keywords, progress = _one_call(client)
    assert (method, positional, keywords) == ("text_to_audio", ("rain on a tin roof",), {
        "model": "tangoflux", "seed": 0, "steps": 6, "duration": 0.5, "guidance_scale": 4.5})
    assert isinstance(progress, _cli_verbs.ProgressLine)
    assert capsys.readouterr().out == \
        "wrote {}: 0.50s of audio at 44100 Hz (seed 7)\n".format(path)
    assert soundfile.info(path).channels == 2
    client.calls = []
    assert cli.main(["text-to-audio", "rain", "-o", path, "--json",
                     "--endpoint", "ipc:///e"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "path": path, "seconds": 0.5, "sample_rate": 44100, "info": {"seed": 7}}
    assert client.opened[-1] == ("ipc:///e", {"timeout": 600.0})


def test_talking_head_writes_the_mp4(client, tmp_path, capsys):
    path = tmp_path / "head.mp4"
    assert cli.main(["talking-head", "said.wav", "-o", str(path), "--model", "alice",
                     "--endpoint", "ipc:///e"]) == 0
    method, positional, keywords, progress = _one_call(client)
    assert (method, positional, keywords) == ("talking_head", ("said.wav",), {"model": "alice"})
    assert isinstance(progress, _cli_verbs.ProgressLine)
    assert path.read_bytes() == RecordingClient.ANSWERS["talking_head"]
    assert capsys.readouterr().out == "wrote {}: 12 bytes of mp4\n".format(path)
    assert cli.main(["talking-head", "said.wav", "-o", str(path), "--json",
                     "--endpoint", "ipc:///e"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(path), "bytes": 12}


@pytest.mark.parametrize("argv", [
    ["say", "hello"], ["tts", "hello"], ["text-to-audio", "rain"], ["talking-head", "a.wav"],
])
def test_the_verbs_that_write_a_file_need_output(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    assert exit_info.value.code == cli.EXIT_USAGE
