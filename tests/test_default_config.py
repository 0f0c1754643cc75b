"""The README's promise: `modelhost up` on the embedded default, then `modelhost say` gives
speech and `modelhost transcribe` turns it back into text."""

import array
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def modelhost(*args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "modelhost.cli"] + list(args), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_up_on_the_default_configuration_then_say_gives_real_speech(tmp_path):
    runtime = Path(tempfile.mkdtemp(prefix="mh-", dir="/tmp"))
    env = dict(os.environ, MODELHOST_RUNTIME_DIR=str(runtime))
    env.pop("MODELHOST_ENDPOINT", None)
    log = open(tmp_path / "up.log", "wb")
    # No --config: the embedded default. Its first run builds the espeak and asr venvs.
    up = subprocess.Popen([sys.executable, "-m", "modelhost.cli", "up"], env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            status = modelhost("ps", "--json", env=env)
            if status.returncode == 0 and all(
                    d["state"] == "ready" for d in json.loads(status.stdout)["daemons"]):
                break
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)

        table = modelhost("ps", env=env).stdout
        assert "espeak" in table and "asr" in table and "ready" in table and "3.12." in table
        daemons = {d["name"]: d for d in json.loads(modelhost("ps", "--json", env=env).stdout)[
            "daemons"]}
        assert set(daemons) == {"espeak", "asr"}  # text to speech and speech to text
        for daemon in daemons.values():
            assert daemon["python"].startswith("3.12.")
        assert not sys.version.startswith("3.12.")  # a different interpreter from the broker's

        wav_path = tmp_path / "hello.wav"
        said = modelhost("say", "hello, this is modelhost speaking", "-o", str(wav_path), env=env)
        assert said.returncode == 0, said.stderr
        assert "of speech at 22050 Hz" in said.stdout
        with wave.open(str(wav_path)) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
            samples = array.array("h", wav.readframes(wav.getnframes()))
        assert len(samples) > 22050  # over a second of audio
        rms = (sum(s * s for s in samples) / len(samples)) ** 0.5
        assert rms > 500  # speech, not silence

        raw_path = tmp_path / "hi.pcm"
        called = modelhost("call", "espeak", "tts", "text=hi", "-o", str(raw_path), env=env)
        assert called.returncode == 0, called.stderr
        assert raw_path.stat().st_size > 1000

        bad = modelhost("say", "x", "--voice", "no-such-voice", "-o", str(tmp_path / "x.wav"), env=env)
        assert bad.returncode == 1 and "bad_arguments" in bad.stderr

        # Speech recognition: the speech of the TTS daemon, back to text (digits, which
        # pocketsphinx hears reliably in espeak's en-us voice; the last word varies).
        digits_path = tmp_path / "digits.wav"
        said = modelhost("say", "two three four five six", "--voice", "en-us", "-o",
                         str(digits_path), env=env)
        assert said.returncode == 0, said.stderr
        heard = modelhost("transcribe", str(digits_path), env=env)
        assert heard.returncode == 0, heard.stderr
        assert heard.stdout.split()[:4] == ["two", "three", "four", "five"], heard.stdout
        transcript = json.loads(modelhost("transcribe", str(digits_path), "--json",
                                          env=env).stdout)
        assert transcript["text"] == heard.stdout.strip() and transcript["language"] == "en"
        assert [w["word"] for w in transcript["words"]][:4] == ["two", "three", "four", "five"]
        bad = modelhost("transcribe", str(raw_path), env=env)  # raw PCM: no WAV header
        assert bad.returncode == 1 and "bad_arguments" in bad.stderr

        # Warm: each daemon loaded once for all of the above.
        for daemon in json.loads(modelhost("ps", "--json", env=env).stdout)["daemons"]:
            assert daemon["loads"] == 1, daemon
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()


def test_setup_of_the_default_configuration_is_idempotent_and_says_so():
    env = dict(os.environ)
    first = modelhost("setup", env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    second = modelhost("setup", "espeak", "asr", env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "unchanged" in second.stderr and "up to date" in second.stderr
    assert "asr: up to date" in second.stderr
    unknown = modelhost("setup", "nope", env=env)
    assert unknown.returncode == 2 and "no daemon named nope" in unknown.stderr
