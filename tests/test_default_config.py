"""The README's promise: `modelhost up` on the embedded default, then `modelhost say`, gives speech."""

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
    # No --config: the embedded default. Its first run builds the espeak venv.
    up = subprocess.Popen([sys.executable, "-m", "modelhost.cli", "up"], env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            status = modelhost("ps", "--json", env=env)
            if status.returncode == 0 and json.loads(status.stdout)["daemons"][0]["state"] == "ready":
                break
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.5)

        table = modelhost("ps", env=env).stdout
        assert "espeak" in table and "ready" in table and "3.12." in table
        daemon = json.loads(modelhost("ps", "--json", env=env).stdout)["daemons"][0]
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

        # Warm: the daemon loaded once for all of the above.
        assert json.loads(modelhost("ps", "--json", env=env).stdout)["daemons"][0]["loads"] == 1
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
    second = modelhost("setup", "espeak", env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "unchanged" in second.stderr and "up to date" in second.stderr
    unknown = modelhost("setup", "nope", env=env)
    assert unknown.returncode == 2 and "no daemon named nope" in unknown.stderr
