"""The client helpers and command-line verbs of the model daemons, through a real `modelhost up`.

The daemons run the real engines with their upstream model objects replaced
by the stand-ins of tests/standins/ (no weights here), under the default names
the helpers use: cosyvoice, tangoflux, talkinggaussian.
"""

import subprocess
import sys

import numpy
import pytest
import soundfile

import modelhost

from conftest import daemon_yaml
from standins.cosyvoice import make_layout
from standins.tangoflux import write_placeholder_weights
from test_cosyvoice import PROMPT, PROMPT_TEXT
from test_talkinggaussian import decode_frames, make_files, wav_bytes

pytestmark = pytest.mark.slow


def flow(options):
    return "{" + ", ".join("{}: {}".format(k, v) for k, v in sorted(options.items())) + "}"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from conftest import Host

    root = tmp_path_factory.mktemp("models")
    weights = write_placeholder_weights(root / "tangoflux")
    weights["device"] = "cpu"
    (root / "cosyvoice").mkdir()
    checkout, model_dir = make_layout(root / "cosyvoice")
    daemons = [
        daemon_yaml("cosyvoice", engine="cosyvoice_standin_engine:CosyVoiceStandInEngine",
                    options=flow({"checkout": checkout, "model_dir": model_dir,
                                  "voices_dir": root / "voices"}), max_payload="32MiB"),
        daemon_yaml("tangoflux", engine="tangoflux_standin_engine:TangoFluxStandInEngine",
                    options=flow(weights), max_payload="64MiB"),
        daemon_yaml("talkinggaussian",
                    engine="talkinggaussian_standin_engine:StandinTalkingGaussianEngine",
                    options=flow(make_files(root / "talkinggaussian")), max_payload="64MiB",
                    ready_timeout_s=120),
    ]
    host = Host(daemons).start()
    try:
        host.wait_ready("cosyvoice", "tangoflux", "talkinggaussian", timeout=120)
        yield host
    finally:
        host.stop()


def cli(host, *args):
    return subprocess.run([sys.executable, "-m", "modelhost", *args, "--endpoint",
                           host.endpoint], capture_output=True, text=True, timeout=120)


def test_tts_with_a_registered_voice_whole_and_streamed(host, tmp_path):
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(PROMPT)
    with modelhost.Client(host.endpoint) as client:
        registered = client.register_voice("narrator", str(prompt), PROMPT_TEXT)
        speech = client.tts("Hello from the stand-in.", voice="narrator")
        chunks = list(client.tts_stream("Hello from the stand-in.", voice="narrator"))
    assert registered["voice_id"] == "narrator"
    assert isinstance(speech, modelhost.Audio) and speech.sample_rate == 24000
    assert speech.samples.dtype == numpy.float32 and speech.samples.ndim == 1
    assert len(chunks) > 1 and all(chunk.sample_rate == 24000 for chunk in chunks)
    streamed = numpy.concatenate([chunk.samples for chunk in chunks])
    assert streamed.shape == speech.samples.shape


def test_text_to_audio_returns_stereo_audio_and_the_seed(host):
    with modelhost.Client(host.endpoint) as client:
        progress = []
        sound = client.text_to_audio("rain on a tin roof", duration=2, steps=4, seed=5,
                                     on_progress=progress.append)
        again = client.text_to_audio("rain on a tin roof", duration=2, steps=4,
                                     seed=sound.info["seed"])
    assert isinstance(sound, modelhost.Audio)
    assert sound.sample_rate == 44100 and sound.samples.shape == (88200, 2)
    assert sound.info["seed"] == 5 and sound.seconds == pytest.approx(2.0)
    # To float precision: torch's CPU threads may sum in another order per call.
    assert numpy.allclose(sound.samples, again.samples, atol=1e-6)
    assert [p.stage for p in progress].count("diffusion") == 5


def test_talking_head_returns_an_mp4_with_one_frame_per_25th_of_a_second(host, tmp_path):
    with modelhost.Client(host.endpoint) as client:
        video = client.talking_head(wav_bytes(1.0))
    frames, _ = decode_frames(video, tmp_path)
    assert isinstance(video, bytes) and len(frames) == 24


def test_audio_files_are_accepted_as_paths(host, tmp_path):
    speech = tmp_path / "speech.wav"
    speech.write_bytes(wav_bytes(1.0))
    with modelhost.Client(host.endpoint) as client:
        video = client.talking_head(str(speech))
    assert len(decode_frames(video, tmp_path)[0]) == 24


def test_the_command_line_verbs_write_files(host, tmp_path):
    prompt = tmp_path / "prompt.wav"
    prompt.write_bytes(PROMPT)
    said = tmp_path / "said.wav"
    done = cli(host, "tts", "Hello from the stand-in.", "-o", str(said), "--prompt-audio",
               str(prompt), "--prompt-text", PROMPT_TEXT)
    assert done.returncode == 0, done.stderr
    data, rate = soundfile.read(str(said))
    assert rate == 24000 and data.ndim == 1 and len(data) > 0

    out = tmp_path / "rain.wav"
    done = cli(host, "text-to-audio", "rain", "-o", str(out), "--duration", "1.5", "--steps",
               "3", "--seed", "9")
    assert done.returncode == 0, done.stderr
    assert "seed 9" in done.stdout
    data, rate = soundfile.read(str(out))
    assert rate == 44100 and data.shape == (66150, 2)

    speech = tmp_path / "speech.wav"
    speech.write_bytes(wav_bytes(1.0))
    video = tmp_path / "head.mp4"
    done = cli(host, "talking-head", str(speech), "-o", str(video))
    assert done.returncode == 0, done.stderr
    assert len(decode_frames(video.read_bytes(), tmp_path)[0]) == 24


def test_a_bad_argument_is_a_typed_error_and_a_clear_cli_message(host):
    with modelhost.Client(host.endpoint) as client:
        with pytest.raises(modelhost.BadArguments, match="duration"):
            client.text_to_audio("rain", duration=99)
    done = cli(host, "text-to-audio", "rain", "-o", "/tmp/never.wav", "--duration", "99")
    assert done.returncode != 0 and "duration" in done.stderr
