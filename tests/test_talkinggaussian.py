"""The TalkingGaussian engine on a CPU, with stand-ins for upstream's CUDA model and scripts.

The engine's own code runs for real: audio decoding and resampling, the
feature windows, the slim cameras and background composites, compositing,
ffmpeg (muxing the frames with the audio, streaming fragmented mp4), the
training job's subprocesses with their progress and cancellation, the
working copy of a read-only dataset, the memory tiers, preflight. Only
`_build_model()` (upstream's Gaussians, motion networks, rasterizer and
HuBERT) and `_stage_command()` (upstream's scripts) are replaced, by the
stand-ins of tests/standins/talkinggaussian.py. One more test builds the real
`_build_model()` from upstream's own classes on the CPU, when
TALKINGGAUSSIAN_CHECKOUT names a checkout (it skips otherwise).
"""

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile
import torch
import imageio_ffmpeg  # installed by tests/run: a missing one must fail, not skip

from modelhost.daemons.engine import CallContext, operations_of
from modelhost.daemons.talkinggaussian import audio as tg_audio
from modelhost.daemons.talkinggaussian import dataset as tg_dataset
from modelhost.daemons.talkinggaussian import engine as tg_engine
from modelhost.daemons.talkinggaussian import training as tg_training
from modelhost.daemons.talkinggaussian import video as tg_video
from modelhost.daemons.talkinggaussian.engine import TalkingGaussianEngine
from modelhost.errors import BadArguments, Cancelled

from conftest import ENGINES, ROOT, daemon_yaml, drain, pid_alive

sys.path.insert(0, str(ENGINES))
sys.path.insert(0, str(ROOT / "tests"))
from standins import talkinggaussian as standins  # noqa: E402
from talkinggaussian_standin_engine import StandinTalkingGaussianEngine  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
WIDTH, HEIGHT = standins.FRAME_SIZE


# --- helpers ----------------------------------------------------------------------------


class Recorder(object):
    """A CallContext whose progress events and partials are kept."""

    def __init__(self, stream=False, on_event=None):
        self.events = []
        self.on_event = on_event
        self.ctx = CallContext(request_id=1, method="test", stream=stream, send=self._send)

    def _send(self, kind, value):
        self.events.append((kind, value))
        if self.on_event is not None:
            self.on_event(self, kind, value)

    def progress(self, stage=None):
        return [v for k, v in self.events if k == "progress" and (stage is None
                                                                   or v["stage"] == stage)]


def wav_bytes(seconds, rate=16000, loud_from=None, channels=1, fmt="WAV", frequency=220.0):
    t = np.arange(int(round(seconds * rate))) / float(rate)
    tone = 0.3 * np.sin(2 * np.pi * frequency * t)
    if loud_from is not None:
        tone[t < loud_from] = 0.0
    samples = np.stack([tone] * channels, axis=1).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt)
    return out.getvalue()


def decode_frames(mp4_bytes, tmp_path, name="video.mp4"):
    """All frames of an mp4 as uint8 [n, H, W, 3], and (width, height)."""
    path = str(tmp_path / name)
    with open(path, "wb") as handle:
        handle.write(mp4_bytes)
    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
    return np.stack(frames), (width, height)


def audio_of(mp4_bytes, tmp_path, rate=16000):
    """The mp4's audio track, decoded to mono float32 at `rate` (None when it has none)."""
    path = str(tmp_path / "audio-check.mp4")
    with open(path, "wb") as handle:
        handle.write(mp4_bytes)
    probe = subprocess.run([FFMPEG, "-hide_banner", "-i", path], stderr=subprocess.PIPE,
                           stdout=subprocess.DEVNULL).stderr.decode()
    if "Audio:" not in probe:
        return None
    out = subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-i", path, "-vn",
                          "-ac", "1", "-ar", str(rate), "-f", "f32le", "pipe:1"],
                         stdout=subprocess.PIPE, check=True).stdout
    return np.frombuffer(out, np.float32)


def streams_of(mp4_bytes, tmp_path):
    path = str(tmp_path / "probe.mp4")
    with open(path, "wb") as handle:
        handle.write(mp4_bytes)
    text = subprocess.run([FFMPEG, "-hide_banner", "-i", path], stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL).stderr.decode()
    return [line.strip() for line in text.splitlines() if "Stream #" in line]


def near(actual, expected, tolerance=14):
    return np.all(np.abs(np.asarray(actual, np.int32) - np.asarray(expected, np.int32))
                  <= tolerance)


def make_files(root, frames=12, training=False):
    root = str(root)
    return {
        "checkout": standins.make_checkout(os.path.join(root, "TalkingGaussian")),
        "data_dir": standins.make_dataset(os.path.join(root, "data", "obama"), frames=frames,
                                          training=training),
        "model_dir": standins.make_model(os.path.join(root, "models", "obama")),
        "hubert_dir": standins.make_hubert_dir(os.path.join(root, "hubert-large-ls960-ft")),
        "work_dir": os.path.join(root, "work"),
    }


@pytest.fixture
def files(tmp_path):
    return make_files(tmp_path)


@pytest.fixture
def engine(files):
    engine = StandinTalkingGaussianEngine(crf=12, **files)
    engine.load()
    yield engine
    engine.unload()


def snapshot(directory):
    """{relative path: (size, mtime)} of everything under a directory."""
    found = {}
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            stat = os.lstat(path)
            found[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture
def read_only():
    """make(directory): read-only for real, even for root (chattr +i where chmod is not enough)."""
    made = []

    def make(directory):
        directory = str(directory)
        for root, dirs, names in os.walk(directory):
            for name in names:
                os.chmod(os.path.join(root, name), 0o444)
        for root, dirs, names in os.walk(directory, topdown=False):
            os.chmod(root, 0o555)
        made.append(directory)
        if os.geteuid() == 0 and shutil.which("chattr"):
            subprocess.run(["chattr", "-R", "+i", directory], stderr=subprocess.DEVNULL)
        probe = os.path.join(directory, ".probe")
        try:
            open(probe, "w").close()
        except OSError:
            return True
        os.unlink(probe)
        return False  # still writable (root without chattr): only the snapshot checks hold

    yield make
    for directory in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-R", "-i", directory], stderr=subprocess.DEVNULL)
        for root, dirs, names in os.walk(directory):
            os.chmod(root, 0o755)


# --- operations, options, argument checks -------------------------------------------------


def test_operations_and_describe(engine):
    assert set(operations_of(engine)) == {"render", "train"}
    facts = engine.describe()
    assert facts["engine"] == "talkinggaussian"
    assert facts["upstream"] == "github.com/Fictionarry/TalkingGaussian@9bd34f7"
    assert facts["subject"] == "obama" and facts["audio_extractor"] == "hubert"
    assert facts["cameras"] == 9 and facts["resolution"] == "{}x{}".format(WIDTH, HEIGHT)
    assert facts["gaussians"] == 16 and facts["gaussians_mouth"] == 8
    assert facts["codec"] in tg_video.CODEC_PREFERENCE and os.path.isfile(facts["ffmpeg"])
    assert tg_engine.AUDIO_EXTRACTORS == tg_audio.EXTRACTORS


@pytest.mark.parametrize("changes, expected", [
    ({"bogus": 1}, "unknown option bogus"),
    ({"model_dir": None}, "options data_dir and model_dir go together"),
    ({"cameras": "test"}, "option cameras must be one of train, val, not 'test'"),
    ({"camera_order": "random"}, "option camera_order must be pingpong or loop"),
    ({"audio_extractor": "wav2vec"}, "option audio_extractor must be one of hubert, deepspeech"),
    ({"crf": 99}, "option crf must be a number from 0 to 51, not 99"),
    ({"subject": "a/b"}, "option subject must be a name"),
    ({"train_env": {"X": 1}}, "option train_env must map variable names to strings"),
])
def test_bad_options(files, changes, expected):
    options = dict(files, **changes)
    with pytest.raises(ValueError) as info:
        StandinTalkingGaussianEngine(**options)
    assert expected in str(info.value)
    assert any(expected in line for line in StandinTalkingGaussianEngine.preflight(options))


@pytest.mark.parametrize("arguments, expected", [
    ({"audio": b""}, "audio is empty"),
    ({"audio": "hello.wav"}, "audio must be the bytes of a WAV or FLAC file, not str"),
    ({"audio": b"RIFF not really a wav file"}, "cannot decode the audio"),
    ({"audio": wav_bytes(0.03)}, "too short for one video frame"),
    ({"audio": wav_bytes(1.0), "start_frame": -1}, "start_frame must be a whole number"),
    ({"audio": wav_bytes(1.0), "start_frame": True}, "start_frame must be a whole number"),
    ({"audio": wav_bytes(1.0), "start_frame": "3"}, "start_frame must be a whole number"),
])
def test_render_bad_arguments(engine, arguments, expected):
    with pytest.raises(BadArguments) as info:
        engine.render(Recorder().ctx, **arguments)
    assert expected in info.value.message


def test_render_refuses_audio_longer_than_allowed(files):
    engine = StandinTalkingGaussianEngine(max_audio_s=2, **files)
    engine.load()
    with pytest.raises(BadArguments) as info:
        engine.render(Recorder().ctx, wav_bytes(2.5))
    assert "lasts 2.5 s, more than the 2 s allowed" in info.value.message


@pytest.mark.parametrize("arguments, expected", [
    ({"subject": ""}, "subject must be a name"),
    ({"subject": "../etc"}, "subject must be a name"),
    ({"subject": "a/b"}, "subject must be a name"),
    ({"subject": 5}, "subject must be a name"),
    ({"subject": "new", "video": b""}, "video must be the bytes of a file, not empty bytes"),
    ({"subject": "new", "video": "clip.mp4"}, "video must be the bytes of a file, not str"),
    ({"subject": "new", "au_csv": 3}, "au_csv must be the bytes of a file, not int"),
    ({"subject": "new", "video": b"x", "audio_extractor": "wav2vec"},
     "audio_extractor must be one of hubert, deepspeech"),
    ({"subject": "new", "video": b"x", "audio_extractor": "deepspeech"},
     "this daemon extracts hubert features"),
    ({"subject": "new", "video": b"x", "overwrite": "yes"}, "overwrite must be true or false"),
    ({"subject": "new"}, "no video, and no dataset for new"),
])
def test_train_bad_arguments(engine, arguments, expected):
    with pytest.raises(BadArguments) as info:
        engine.train(Recorder().ctx, **arguments)
    assert expected in info.value.message


def test_calls_need_a_loaded_engine(files):
    engine = StandinTalkingGaussianEngine(**files)
    with pytest.raises(RuntimeError) as info:
        engine.render(Recorder().ctx, wav_bytes(1.0))
    assert "not loaded" in str(info.value)


def test_a_trainer_daemon_does_not_render(files):
    options = dict(files, data_dir=None, model_dir=None)
    trainer = StandinTalkingGaussianEngine(**options)
    assert StandinTalkingGaussianEngine.preflight(options) == []
    trainer.load()
    assert trainer.describe()["subject"] is None
    with pytest.raises(BadArguments) as info:
        trainer.render(Recorder().ctx, wav_bytes(1.0))
    assert "no trained model" in info.value.message and "only trains" in info.value.message


# --- audio --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, channels, fmt", [(16000, 1, "WAV"), (22050, 2, "WAV"),
                                                 (48000, 1, "FLAC"), (44100, 2, "FLAC")])
def test_decode_and_resample(rate, channels, fmt):
    data = wav_bytes(1.5, rate=rate, channels=channels, fmt=fmt, frequency=440.0)
    samples, decoded_rate = tg_audio.decode_audio(data)
    assert decoded_rate == rate and samples.shape == (int(1.5 * rate), channels)
    speech = tg_audio.speech_16k(samples, decoded_rate)
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert abs(len(speech) - 24000) <= 1
    spectrum = np.abs(np.fft.rfft(speech[2000:18000]))
    assert abs(np.argmax(spectrum) * 16000.0 / 16000 - 440) <= 2  # 1 Hz bins: still 440 Hz
    assert abs(np.sqrt(np.mean(speech[2000:-2000] ** 2)) - 0.3 / np.sqrt(2)) < 0.01


def test_decode_rejects_bad_audio():
    with pytest.raises(tg_audio.AudioError):
        tg_audio.decode_audio(b"\x00" * 100)
    with pytest.raises(tg_audio.AudioError) as info:
        tg_audio.decode_audio(wav_bytes(3.0), max_seconds=1)
    assert "3.0 s" in str(info.value)


def test_hubert_frame_count_matches_its_convolutions():
    for n in list(range(0, 5000, 7)) + [16000, 16000 * 21 + 123, 720000]:
        states = tg_audio.hubert_states(n)
        assert states == max(0, (n - 80) // 320) if n >= 400 else states == 0
        assert tg_audio.hubert_frame_count(n) == max(0, (n - 80) // 320) // 2
    # one second of speech: 49 states at 50 Hz, 24 video frames at 25 fps
    assert tg_audio.hubert_frame_count(16000) == 24
    assert tg_audio.frame_count("hubert", 16000) == 24
    assert tg_audio.frame_count("deepspeech", 16000) == 25


@pytest.mark.parametrize("seconds", [0.045, 0.05, 0.5, 1.0, 2.37, 20.2, 45.0])
def test_hubert_features_per_frame(seconds):
    speech = np.sin(np.arange(int(seconds * 16000)) / 7.0).astype(np.float32)
    speech[: len(speech) // 2] *= 0.1
    model, processor = standins.StandinHubert(), standins.StandinFeatureExtractor()
    features = tg_audio.HubertFeatures(model, processor).extract(speech)
    assert features.shape == (tg_audio.hubert_frame_count(len(speech)), 2, 1024)
    assert features.dtype == np.float32
    # Long audio goes through the model in pieces of 320 * 1000 (+ 80) samples ...
    pieces = len(model.calls)
    assert pieces == max(1, -(-len(speech) // 320000)) if len(speech) >= 400 else pieces == 0
    assert all(t <= 320080 for t in model.calls)
    # ... and the pieces join up exactly where one pass over the whole would be.
    if len(speech) >= 400:
        whole = standins.StandinHubert()(torch.from_numpy(
            processor(speech, sampling_rate=16000).input_values))
        states = whole.last_hidden_state[0].detach().numpy()
        expected = states[:2 * features.shape[0]].reshape(-1, 2, 1024)
        assert np.allclose(features, expected, atol=1e-5)


def test_feature_window_edges_as_upstream():
    count = 10
    features = np.arange(count * 3 * 2, dtype=np.float32).reshape(count, 3, 2)

    def upstream(index):  # utils/audio_utils.get_audio_features(features, att_mode=2, index)
        left, right = index - 4, index + 4
        pad_left, pad_right = max(0, -left), max(0, right - count)
        part = features[max(left, 0):min(right, count)]
        return np.concatenate([np.zeros((pad_left, 3, 2), np.float32), part,
                               np.zeros((pad_right, 3, 2), np.float32)])

    for index in range(count):
        window = tg_audio.feature_window(features, index)
        assert window.shape == (8, 3, 2)
        assert np.array_equal(window, upstream(index))
    first = tg_audio.feature_window(features, 0)
    assert not first[:4].any() and np.array_equal(first[4:], features[:4])
    last = tg_audio.feature_window(features, count - 1)
    assert np.array_equal(last[:5], features[count - 5:]) and not last[5:].any()
    assert np.array_equal(tg_audio.feature_window(features, 5), features[1:9])
    with pytest.raises(IndexError):
        tg_audio.feature_window(features, count)


def test_model_layout_and_deepspeech_windows():
    hubert = np.zeros((7, 2, 1024), np.float32)
    assert tg_audio.model_layout(hubert).shape == (7, 1024, 2)  # the reader's permute(0, 2, 1)
    n = 16000
    steps = 50
    logits = np.tile(np.arange(steps, dtype=np.float32)[:, None], (1, 29)) + 1
    windows = tg_audio.deepspeech_windows(logits, n)
    assert windows.shape == (tg_audio.deepspeech_frame_count(n), 16, 29) == (25, 16, 29)
    assert not windows[0, :8].any() and windows[0, 8, 0] == 1  # 8 zero steps, then the audio
    assert windows[1, 6, 0] == 1 and windows[3, 0, 0] == 0 and windows[3, 2, 0] == 1
    assert windows[10, 5, 0] == 2 * 10 + 5 - 8 + 1
    assert tg_audio.model_layout(windows).shape == (25, 29, 16)


# --- the dataset, read the slim way ---------------------------------------------------------


def test_cameras_and_backgrounds(files):
    cameras = tg_dataset.read_cameras(files["data_dir"], "train")
    assert [c.img_id for c in cameras] == list(range(9))
    camera = cameras[3]
    assert (camera.width, camera.height) == (WIDTH, HEIGHT)
    assert abs(camera.fovx - 2 * np.arctan(WIDTH / 2400.0)) < 1e-9
    # c2w with OpenGL axes -> upstream's R (transposed w2c rotation) and T
    c2w = np.eye(4)
    c2w[0, 3], c2w[2, 3] = 0.003, -0.5
    c2w[:3, 1:3] *= -1
    w2c = np.linalg.inv(c2w)
    assert np.allclose(camera.R, w2c[:3, :3].T) and np.allclose(camera.T, w2c[:3, 3])
    assert camera.expression.shape == (6,) and camera.expression.dtype == np.float32
    assert 0 <= camera.expression[-1] <= 2  # AU45, clipped as upstream does
    assert [c.img_id for c in tg_dataset.read_cameras(files["data_dir"], "val")] == [9, 10, 11]
    backgrounds = tg_dataset.Backgrounds(files["data_dir"])
    frame = backgrounds(5)
    assert frame.shape == (HEIGHT, WIDTH, 3) and frame.dtype == np.uint8
    assert near(frame[-1, 10], [100, 100, 100], 0)  # the torso strip, opaque
    assert near(frame[5, 10], standins.background_image(WIDTH, HEIGHT)[5, 10], 6)  # bc.jpg
    assert backgrounds(5) is frame  # cached


def test_saved_arguments_and_malformed_files(files, tmp_path):
    saved = tg_dataset.read_saved_arguments(files["model_dir"])
    assert saved["audio_extractor"] == "hubert" and saved["sh_degree"] == 2
    assert saved["white_background"] is False
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg_args").write_text("__import__('os').system('echo no')")
    with pytest.raises(tg_dataset.DatasetError) as info:
        tg_dataset.read_saved_arguments(str(bad))
    assert str(bad / "cfg_args") in str(info.value)
    (bad / "au.csv").write_text("frame, AU01_r\n1, 0.5\n")
    with pytest.raises(tg_dataset.DatasetError) as info:
        tg_dataset.read_expressions(str(bad / "au.csv"))
    assert "no column AU04_r" in str(info.value)


def test_camera_sequence():
    assert tg_dataset.camera_sequence(10, 0, 4) == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert tg_dataset.camera_sequence(4, 5, 4) == [1, 0, 1, 2]
    assert tg_dataset.camera_sequence(6, 2, 4, "loop") == [2, 3, 0, 1, 2, 3]
    assert tg_dataset.camera_sequence(3, 0, 1) == [0, 0, 0]


# --- ffmpeg ------------------------------------------------------------------------------


def test_find_ffmpeg(tmp_path, monkeypatch):
    with pytest.raises(tg_video.FfmpegError) as info:
        tg_video.find_ffmpeg(str(tmp_path / "no-ffmpeg"))
    assert str(tmp_path / "no-ffmpeg") in str(info.value)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there: imageio-ffmpeg's binary
    assert tg_video.find_ffmpeg() == imageio_ffmpeg.get_ffmpeg_exe()
    assert tg_video.find_ffmpeg(FFMPEG) == FFMPEG


def _test_frames(count, width=WIDTH, height=HEIGHT):
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i, :, :, 0] = (i * 5) % 256
        frames[i, :, :, 1] = 128
        frames[i, :, :, 2] = 255 - (i * 5) % 256
    return frames


@pytest.mark.parametrize("width, height", [(WIDTH, HEIGHT), (63, 47)])
def test_muxing_frames_with_audio(tmp_path, width, height):
    frames = _test_frames(50, width, height)
    audio = str(tmp_path / "audio.wav")
    soundfile.write(audio, np.sin(np.arange(88200) / 20.0).astype(np.float32) * 0.2, 44100)
    output = str(tmp_path / "out.mp4")
    encoder = tg_video.VideoEncoder(FFMPEG, width, height, 25, audio, str(tmp_path),
                                    output=output, codec=tg_video.choose_codec(FFMPEG), crf=10)
    for frame in frames:
        encoder.write(frame)
    assert encoder.finish() == []
    data = open(output, "rb").read()
    decoded, size = decode_frames(data, tmp_path)
    assert len(decoded) == 50
    assert size == (width + width % 2, height + height % 2)  # padded to even for 4:2:0
    for i in (0, 17, 49):
        assert near(decoded[i, height // 2, width // 2], frames[i, height // 2, width // 2])
    sound = audio_of(data, tmp_path)
    assert sound is not None and abs(len(sound) / 16000.0 - 2.0) < 0.05
    streams = streams_of(data, tmp_path)
    assert any("Video: h264" in s or "Video: mpeg4" in s for s in streams)
    assert any("Audio: aac" in s for s in streams)


def test_fragmented_stream_segments(tmp_path):
    audio = str(tmp_path / "audio.wav")
    soundfile.write(audio, np.zeros(16000 * 3, np.float32), 16000)
    encoder = tg_video.VideoEncoder(FFMPEG, WIDTH, HEIGHT, 25, audio, str(tmp_path),
                                    output=None, codec=tg_video.choose_codec(FFMPEG),
                                    segment_frames=10)
    segments = []
    for frame in _test_frames(75):
        encoder.write(frame)
        segments += encoder.segments()
    segments += encoder.finish()
    kinds = [kind for kind, _ in segments]
    assert kinds[0] == "init" and segments[0][1][4:8] == b"ftyp"
    media = [data for kind, data in segments if kind == "media"]
    assert len(media) >= 7  # a fragment per 10 frames (0.4 s)
    assert all(data[4:8] == b"moof" for data in media)
    assert set(kinds) <= {"init", "media", "index"} and kinds.count("init") == 1
    whole = b"".join(data for _, data in segments)
    decoded, size = decode_frames(whole, tmp_path)
    assert len(decoded) == 75 and size == (WIDTH, HEIGHT)
    # byte by byte, the segmenter cuts the same segments
    segmenter = tg_video.Mp4Segmenter()
    again = []
    for i in range(0, len(whole), 7):
        again += segmenter.feed(whole[i:i + 7])
    again += segmenter.finish()
    assert again == segments


def test_ffmpeg_failure_is_reported(tmp_path):
    encoder = tg_video.VideoEncoder(FFMPEG, WIDTH, HEIGHT, 25, str(tmp_path / "missing.wav"),
                                    str(tmp_path), output=str(tmp_path / "o.mp4"))
    with pytest.raises(tg_video.FfmpegError) as info:
        for frame in _test_frames(400):
            encoder.write(frame)
        encoder.finish()
    assert "missing.wav" in str(info.value)
    encoder.abort()


# --- render --------------------------------------------------------------------------------


def expected_frame_parts(engine, frame_index, start_frame=0):
    """What the stand-in renders for frame i: (face colour, camera's background)."""
    count = frame_index + 1
    order = tg_dataset.camera_sequence(count, start_frame, len(engine.cameras))
    camera = engine.cameras[order[frame_index]]
    return standins.face_colour(camera.index), engine.backgrounds(camera.img_id)


def test_render_whole(engine, tmp_path):
    recorder = Recorder()
    # one second of silence, then one second of a tone: the stand-in mouth opens
    result = engine.render(recorder.ctx, wav_bytes(2.0, rate=22050, loud_from=1.0))
    frames_expected = tg_audio.hubert_frame_count(32000)
    assert frames_expected == 49
    video = result.pop("video")
    assert result == {"format": "mp4", "fps": 25, "frames": 49, "width": WIDTH,
                      "height": HEIGHT, "duration_s": 49 / 25.0, "audio_s": 2.0,
                      "sample_rate": 22050, "codec": engine.codec, "subject": "obama",
                      "start_frame": 0, "next_frame": 49, "bytes": len(video)}
    frames, size = decode_frames(video, tmp_path)
    assert len(frames) == 49 and size == (WIDTH, HEIGHT)
    for i in (0, 8, 9, 30, 48):  # 9 cameras: 0..8, then back
        face, background = expected_frame_parts(engine, i)
        assert near(frames[i, 5, WIDTH // 2], face), i
        assert near(frames[i, HEIGHT - 2, 3], background[HEIGHT - 2, 3]), i  # torso strip
        assert near(frames[i, HEIGHT // 2 + 2, 2], background[HEIGHT // 2 + 2, 2]), i
    mouth = frames[:, HEIGHT * 5 // 8, WIDTH // 2].astype(int).mean(axis=1)
    assert mouth[5:20].max() < 20  # silence: a dark mouth
    assert mouth[30:45].min() > 60  # a tone: a lit one
    sound = audio_of(video, tmp_path)
    assert sound is not None and abs(len(sound) / 16000.0 - 2.0) < 0.05
    assert np.abs(sound[: 16000 - 2000]).max() < 0.02 < np.abs(sound[18000:30000]).max()
    render_progress = recorder.progress("render")
    assert [p["fraction"] for p in render_progress] == [(i + 1) / 49.0 for i in range(49)]
    assert render_progress[-1]["message"] == "frame 49 of 49"
    assert recorder.progress()[0]["stage"] == "features"
    assert os.listdir(engine._scratch_dir()) == []  # temporary files gone


def test_render_start_frame_continues_the_camera_track(engine, tmp_path):
    result = engine.render(Recorder().ctx, wav_bytes(1.0), start_frame=13)
    frames, _ = decode_frames(result["video"], tmp_path)
    for i in (0, 5, 20):
        face, _ = expected_frame_parts(engine, i, start_frame=13)
        assert near(frames[i, 5, WIDTH // 2], face)
    assert result["next_frame"] == 13 + 24


def test_render_stream(files, tmp_path):
    engine = StandinTalkingGaussianEngine(segment_s=0.4, **files)
    engine.load()
    recorder = Recorder(stream=True)
    stream = engine.render(recorder.ctx, wav_bytes(3.0))
    assert not isinstance(stream, dict)
    order = []
    recorder.on_event = lambda r, kind, value: order.append(("progress", value["fraction"]))
    chunks = []
    while True:
        try:
            chunk = next(stream)
        except StopIteration as stop:
            summary = stop.value
            break
        chunks.append(chunk)
        order.append(("chunk", chunk["kind"]))
    assert chunks[0]["kind"] == "init" and [c["index"] for c in chunks] == list(range(len(
        chunks)))
    media = [c for c in chunks if c["kind"] == "media"]
    assert len(media) >= 6
    # segments go out while frames are still being rendered
    first_media = order.index(("chunk", "media"))
    assert any(kind == "progress" and fraction < 1.0 for kind, fraction in order[first_media:])
    assert chunks[0]["frames"] < summary["frames"]
    assert summary["format"] == "fmp4" and summary["frames"] == 74
    assert summary["segments"] == len(chunks)
    whole = b"".join(c["data"] for c in chunks)
    assert summary["bytes"] == len(whole)
    frames, size = decode_frames(whole, tmp_path)
    assert len(frames) == 74 and size == (WIDTH, HEIGHT)
    sound = audio_of(whole, tmp_path)
    assert sound is not None and abs(len(sound) / 16000.0 - 3.0) < 0.06


def _children_named(name):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry)) as handle:
                stat = handle.read()
            with open("/proc/{}/cmdline".format(entry), "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses (a
        # load generator's "stress-ng-cpu [run]"), so the fields start after the last ")".
        fields = stat[stat.rfind(")") + 1:].split()
        if len(fields) < 2:
            continue  # gone while being read
        state, ppid = fields[0], int(fields[1])
        if ppid == os.getpid() and name.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def test_children_named_reads_processes_whose_names_have_spaces():
    # Any process on the machine is read, whatever its name (prctl PR_SET_NAME = 15).
    child = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(None).prctl(15, b'odd (name) x', "
         "0, 0, 0); print('named', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"named\n"
        with open("/proc/{}/comm".format(child.pid)) as handle:
            assert handle.read().strip() == "odd (name) x"
        assert _children_named("prctl") == [child.pid] and _children_named("ffmpeg") == []
    finally:
        child.stdin.close()
        child.wait()


def test_cancel_render(engine):
    def cancel_at_frame_5(recorder, kind, value):
        if kind == "progress" and value["stage"] == "render" and value["fraction"] >= 5 / 49.0:
            recorder.ctx.cancel()

    recorder = Recorder(on_event=cancel_at_frame_5)
    with pytest.raises(Cancelled):
        engine.render(recorder.ctx, wav_bytes(2.0))
    assert len(recorder.progress("render")) == 5
    assert _children_named("ffmpeg") == []
    assert os.listdir(engine._scratch_dir()) == []
    # streamed: cancelled, or abandoned by the client (the runtime closes the generator)
    recorder = Recorder(stream=True)
    stream = engine.render(recorder.ctx, wav_bytes(3.0))
    next(stream)
    recorder.ctx.cancel()
    with pytest.raises(Cancelled):
        drain(stream)
    stream = engine.render(Recorder(stream=True).ctx, wav_bytes(3.0))
    next(stream)
    stream.close()
    assert _children_named("ffmpeg") == []
    assert os.listdir(engine._scratch_dir()) == []
    assert engine.render(Recorder().ctx, wav_bytes(0.5))["frames"] == 12


def test_cancel_after_the_last_frame_stops_a_stream(engine):
    # ffmpeg may have no segment ready until the last frame is in (a busy
    # machine): then the stream's first chunks come after rendering, and a
    # cancel there must still end it with Cancelled, and clean up.
    def cancel_after_the_last_frame(recorder, kind, value):
        if kind == "progress" and value["stage"] == "render" and value["fraction"] == 1.0:
            recorder.ctx.cancel()

    recorder = Recorder(stream=True, on_event=cancel_after_the_last_frame)
    stream = engine.render(recorder.ctx, wav_bytes(1.0))
    with pytest.raises(Cancelled):
        drain(stream)
    assert recorder.progress("render")[-1]["fraction"] == 1.0
    assert _children_named("ffmpeg") == []
    assert os.listdir(engine._scratch_dir()) == []


def test_render_reads_read_only_inputs_and_writes_nothing(tmp_path, read_only):
    files = make_files(tmp_path)
    for name in ("data_dir", "model_dir", "hubert_dir", "checkout"):
        read_only(files[name])
    before = {name: snapshot(files[name]) for name in ("data_dir", "model_dir")}
    engine = StandinTalkingGaussianEngine(**files)
    assert StandinTalkingGaussianEngine.preflight(files) == []
    engine.load()
    assert engine.render(Recorder().ctx, wav_bytes(1.0))["frames"] == 24
    assert {name: snapshot(files[name]) for name in ("data_dir", "model_dir")} == before


# --- tiers -----------------------------------------------------------------------------------


def test_tiers_on_cpu(engine, tmp_path):
    model = engine.model
    engine.offload()
    assert engine.model is model and engine._homes == {"model": "cpu"}
    assert model.gaussians._xyz.device.type == "cpu"
    engine.onload()
    assert engine._homes == {} and engine.model.device == "cpu"
    assert engine.render(Recorder().ctx, wav_bytes(0.5))["frames"] == 12
    engine.unload()
    assert engine.model is None and engine.cameras == [] and engine.backgrounds is None
    with pytest.raises(RuntimeError):
        engine.render(Recorder().ctx, wav_bytes(0.5))
    engine.load()
    assert engine.loads == 2
    assert engine.render(Recorder().ctx, wav_bytes(0.5))["frames"] == 12


def test_upstream_model_moves_every_tensor(engine):
    # "meta" tensors stand for another device on a machine without one.
    model = engine.model.to("meta")
    for gaussians in (model.gaussians, model.gaussians_mouth):
        for name in tg_engine.GAUSSIAN_TENSORS:
            assert getattr(gaussians, name).device.type == "meta", name
    for module in (model.motion_net, model.motion_net_mouth, model.audio_encoder.model):
        assert all(p.device.type == "meta" for p in module.parameters())
    assert model.background.device.type == "meta" and model.audio_encoder.device == "meta"
    assert model.device == "meta"


# --- preflight ---------------------------------------------------------------------------------


def test_preflight_all_present(files):
    assert StandinTalkingGaussianEngine.preflight(files) == []


def test_preflight_names_each_missing_path(files, tmp_path):
    os.unlink(os.path.join(files["checkout"], "scene", "motion_net.py"))
    os.unlink(os.path.join(files["data_dir"], "au.csv"))
    shutil.rmtree(os.path.join(files["data_dir"], "torso_imgs"))
    os.unlink(os.path.join(files["model_dir"], "chkpnt_fuse_latest.pth"))
    os.unlink(os.path.join(files["hubert_dir"], "pytorch_model.bin"))
    problems = StandinTalkingGaussianEngine.preflight(files)
    checkout, data, model, hubert = (files["checkout"], files["data_dir"], files["model_dir"],
                                     files["hubert_dir"])
    assert problems == [
        "{}/scene/motion_net.py is missing: the checkout at {} is incomplete; expected "
        "github.com/Fictionarry/TalkingGaussian's scene/motion_net.py at commit 9bd34f7".format(
            checkout, checkout),
        "{}/au.csv is missing: expected OpenFace's FeatureExtraction action units of the video "
        "(renamed to au.csv)".format(data),
        "{}/torso_imgs is missing: expected a directory of <img_id>.png torso images "
        "(process.py task 6)".format(data),
        "{}/chkpnt_fuse_latest.pth is missing: expected the fused checkpoint that "
        "train_fuse.py writes (face and mouth Gaussians with their motion networks)".format(
            model),
        "{}/pytorch_model.bin is missing: expected facebook/hubert-large-ls960-ft's weights "
        "(or model.safetensors)".format(hubert),
    ]


def test_preflight_missing_directories(tmp_path):
    options = {"checkout": str(tmp_path / "TalkingGaussian"), "data_dir": str(tmp_path / "d"),
               "model_dir": str(tmp_path / "m"), "hubert_dir": str(tmp_path / "h")}
    problems = StandinTalkingGaussianEngine.preflight(options)
    assert problems[0].startswith("TalkingGaussian checkout not found at {}: expected `git "
                                  "clone --recursive".format(tmp_path / "TalkingGaussian"))
    assert problems[1].startswith("subject dataset not found at {}:".format(tmp_path / "d"))
    assert problems[2].startswith("trained model not found at {}:".format(tmp_path / "m"))
    assert problems[3].startswith("HuBERT weights not found at {}:".format(tmp_path / "h"))
    no_hubert = dict(options)
    del no_hubert["hubert_dir"]
    assert any(line.startswith("option hubert_dir is not set")
               for line in StandinTalkingGaussianEngine.preflight(no_hubert))


def test_preflight_extractor_must_match_the_model(files):
    problems = StandinTalkingGaussianEngine.preflight(dict(files, audio_extractor="deepspeech"))
    assert "option audio_extractor is deepspeech but the model in {} was trained on hubert " \
           "features (its cfg_args); leave the option out".format(files["model_dir"]) in problems


def test_preflight_of_the_real_engine_names_the_cuda_extensions(files):
    problems = TalkingGaussianEngine.preflight(files)
    python = sys.executable
    for name, source in (("diff_gaussian_rasterization._C", "submodules/diff-gaussian-rasterization"),
                         ("simple_knn._C", "submodules/simple-knn"),
                         ("_gridencoder", "gridencoder")):
        assert ("CUDA extension {} is not built for {}: build it on a machine with an NVIDIA GPU "
                "and the CUDA toolkit (nvcc) with `{} -m pip install --no-build-isolation "
                "{}`".format(name, python, python, os.path.join(files["checkout"], source))
                in problems)
    assert any("Python package transformers is not installed" in line for line in problems) \
        == (not tg_engine._module_found("transformers"))


def test_preflight_runs_in_the_daemons_interpreter(files):
    from modelhost.daemons.preflight import problems_of

    engine = "talkinggaussian_standin_engine:StandinTalkingGaussianEngine"
    assert problems_of(engine, files) == []
    assert problems_of(engine, dict(files, data_dir="/nonexistent/obama"))[0].startswith(
        "subject dataset not found at /nonexistent/obama")


# --- train ---------------------------------------------------------------------------------


def training_env(**extra):
    env = {"TG_STANDIN_STEPS": "30", "TG_STANDIN_STEP_S": "0.01"}
    env.update(extra)
    return env


def make_video(tmp_path, seconds=1.2):
    """A talking-head video with sound, made with the engine's own muxer."""
    frames = int(seconds * 25)
    audio = str(tmp_path / "clip.wav")
    soundfile.write(audio, (0.2 * np.sin(np.arange(int(seconds * 16000)) / 9.0)).astype(
        np.float32), 16000)
    output = str(tmp_path / "clip.mp4")
    encoder = tg_video.VideoEncoder(FFMPEG, WIDTH, HEIGHT, 25, audio, str(tmp_path),
                                    output=output, codec=tg_video.choose_codec(FFMPEG))
    for frame in _test_frames(frames):
        encoder.write(frame)
    encoder.finish()
    return open(output, "rb").read()


def test_train_from_a_video(files, tmp_path):
    engine = StandinTalkingGaussianEngine(train_env=training_env(), **files)
    engine.load()
    recorder = Recorder()
    au = open(os.path.join(files["data_dir"], "au.csv"), "rb").read()
    result = engine.train(recorder.ctx, "newsubject", video=make_video(tmp_path), au_csv=au)
    train_dir = os.path.join(files["work_dir"], "train")
    assert result["subject"] == "newsubject" and result["audio_extractor"] == "hubert"
    assert result["data_dir"] == os.path.join(train_dir, "data", "newsubject")
    assert result["model_dir"] == os.path.join(train_dir, "models", "newsubject")
    assert result["logs"] == os.path.join(train_dir, "logs", "newsubject")
    assert [(s["stage"], s["detail"]) for s in result["steps"]] == [
        ("preprocess", "task 1: extract audio"), ("preprocess", "task 3: extract images"),
        ("preprocess", "task 4: face parsing"), ("preprocess", "task 5: background"),
        ("preprocess", "task 6: torso and ground truth"), ("preprocess", "task 7: landmarks"),
        ("preprocess", "task 8: face tracking"), ("preprocess", "task 9: transforms"),
        ("au", "from au_csv"), ("teeth", None), ("audio", "aud_hu.npy [29, 2, 1024]"),
        ("mouth", None), ("face", None), ("fuse", None)]
    data = result["data_dir"]
    assert os.path.isfile(os.path.join(data, "newsubject.mp4"))  # upstream's data/<ID>/<ID>.mp4
    assert len(glob.glob(os.path.join(data, "ori_imgs", "*.jpg"))) == 30  # ffmpeg, from PATH
    assert np.load(os.path.join(data, "aud_hu.npy")).shape == (29, 2, 1024)  # 1.2 s
    assert len(glob.glob(os.path.join(data, "teeth_mask", "*.npy"))) == 30
    model = result["model_dir"]
    assert sorted(os.listdir(model)) == ["cfg_args", "chkpnt_face_latest.pth",
                                         "chkpnt_fuse_latest.pth", "chkpnt_mouth_latest.pth"]
    assert not os.path.exists(model + ".partial")
    # progress: each stage, with its steps, in order, never going back, ending at 1
    events = recorder.progress()
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = []
    for event in events:
        if not stages or stages[-1] != event["stage"]:
            stages.append(event["stage"])
    assert stages == ["prepare", "preprocess", "au", "teeth", "audio", "mouth", "face", "fuse",
                      "done"]
    for stage in ("mouth", "face", "fuse"):
        steps = [e["message"] for e in events if e["stage"] == stage]
        assert "{}: 30/30".format(stage) in steps
        assert len(steps) >= 4, steps  # start, some steps, done
    assert any(e["message"] == "preprocess task 8: face tracking: 8/8" for e in events)
    # the arguments of upstream's train_xx.sh reached the scripts
    log = open(os.path.join(result["logs"], "face.log")).read()
    assert "stand-in train_face.py -s {} -m {}.partial --audio_extractor hubert --init_num 2000 " \
           "--densify_grad_threshold 0.0005".format(data, model) in log
    log = open(os.path.join(result["logs"], "fuse.log")).read()
    assert "--audio_extractor hubert --opacity_lr 0.001" in log
    assert "audio_extractor='hubert'" in open(os.path.join(model, "cfg_args")).read()
    # and the trained subject is laid out to be served by a daemon of its own
    assert StandinTalkingGaussianEngine.preflight(dict(
        checkout=files["checkout"], data_dir=data, model_dir=model,
        hubert_dir=files["hubert_dir"])) == []
    assert StandinTalkingGaussianEngine(checkout=files["checkout"], data_dir=data,
                                        model_dir=model).subject == "newsubject"


def test_train_overwrite(files, tmp_path):
    engine = StandinTalkingGaussianEngine(train_env=training_env(TG_STANDIN_STEP_S="0"),
                                          **files)
    engine.load()
    au = open(os.path.join(files["data_dir"], "au.csv"), "rb").read()
    video = make_video(tmp_path, 0.6)
    first = engine.train(Recorder().ctx, "sub", video=video, au_csv=au)
    with pytest.raises(BadArguments) as info:
        engine.train(Recorder().ctx, "sub", video=video, au_csv=au)
    assert "sub is trained already ({}); pass overwrite=true".format(first["model_dir"]) \
        in info.value.message
    engine.train(Recorder().ctx, "sub", video=video, au_csv=au, overwrite=True)
    assert os.path.isfile(os.path.join(first["model_dir"] + ".previous",
                                       "chkpnt_fuse_latest.pth"))


def test_train_runs_openface_when_configured(files, tmp_path):
    engine = StandinTalkingGaussianEngine(
        train_env=training_env(TG_STANDIN_STEP_S="0"), openface=standins.HERE, **files)
    engine.load()
    result = engine.train(Recorder().ctx, "faces", video=make_video(tmp_path, 0.6))
    assert ("au", None) in [(s["stage"], s["detail"]) for s in result["steps"]]
    rows = tg_dataset.read_expressions(os.path.join(result["data_dir"], "au.csv"))
    assert rows.shape == (15, 6)


def test_training_problems_name_exact_paths(files, tmp_path):
    os.unlink(os.path.join(files["checkout"], "data_utils", "face_parsing", "79999_iter.pth"))
    os.unlink(os.path.join(files["checkout"], "train_face.py"))
    engine = StandinTalkingGaussianEngine(**files)
    engine.load()
    with pytest.raises(RuntimeError) as info:
        engine.train(Recorder().ctx, "x", video=b"some video")
    message = str(info.value)
    checkout = files["checkout"]
    assert message.startswith("train: cannot train x here: ")
    assert "OpenFace's FeatureExtraction not found at None: set option openface to it, or " \
           "send au_csv" in message
    assert "{}/train_face.py is missing: expected upstream's train_face.py in the " \
           "checkout".format(checkout) in message
    assert "{}/data_utils/face_parsing/79999_iter.pth is missing: expected the face-parsing " \
           "model (scripts/prepare.sh)".format(checkout) in message
    assert not os.path.exists(os.path.join(files["work_dir"], "train", "data", "x"))


def test_train_failure_names_the_step_and_keeps_the_data(files, tmp_path):
    engine = StandinTalkingGaussianEngine(
        train_env=training_env(TG_STANDIN_STEP_S="0", TG_STANDIN_FAIL="train_face.py"), **files)
    engine.load()
    au = open(os.path.join(files["data_dir"], "au.csv"), "rb").read()
    with pytest.raises(RuntimeError) as info:
        engine.train(Recorder().ctx, "broken", video=make_video(tmp_path, 0.6), au_csv=au)
    data = os.path.join(files["work_dir"], "train", "data", "broken")
    model = os.path.join(files["work_dir"], "train", "models", "broken")
    message = str(info.value)
    assert message.startswith("train: face (train_face.py) failed with status 1; its last "
                              "output:")
    assert "RuntimeError: stand-in failure of train_face.py" in message
    assert "the dataset stays at {}".format(data) in message
    assert not os.path.exists(model + ".partial") and not os.path.exists(model)
    assert os.path.isfile(os.path.join(data, "transforms_train.json"))


def test_cancel_training_kills_the_step_and_its_children(files, tmp_path):
    pids = str(tmp_path / "pids")
    engine = StandinTalkingGaussianEngine(
        train_env=training_env(TG_STANDIN_STEPS="3000", TG_STANDIN_STEP_S="0.02",
                               TG_STANDIN_PIDS=pids), **files)
    engine.load()
    recorder = Recorder()
    outcome = []
    au = open(os.path.join(files["data_dir"], "au.csv"), "rb").read()
    video = make_video(tmp_path, 0.6)

    def run():
        try:
            outcome.append(engine.train(recorder.ctx, "slow", video=video, au_csv=au))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while not (os.path.exists(pids) and open(pids).read().strip()):
        assert time.monotonic() < deadline and worker.is_alive(), outcome
        time.sleep(0.05)
    script_pid, grandchild_pid = [int(p) for p in open(pids).read().split()]
    assert pid_alive(script_pid) and pid_alive(grandchild_pid)
    time.sleep(0.5)
    assert [e for e in recorder.progress("mouth") if "/3000" in (e["message"] or "")]
    cancelled_at = time.monotonic()
    recorder.ctx.cancel()
    worker.join(30)
    assert not worker.is_alive()
    assert isinstance(outcome[0], Cancelled), outcome
    assert "during mouth" in outcome[0].message
    assert time.monotonic() - cancelled_at < 10
    deadline = time.monotonic() + 10
    while (pid_alive(script_pid) or pid_alive(grandchild_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(script_pid) and not pid_alive(grandchild_pid)
    model = os.path.join(files["work_dir"], "train", "models", "slow")
    assert not os.path.exists(model + ".partial") and not os.path.exists(model)
    # the engine takes the next job, on the dataset the cancelled one prepared
    engine.train_env.update(TG_STANDIN_STEPS="5", TG_STANDIN_STEP_S="0", TG_STANDIN_PIDS="")
    assert engine.train(Recorder().ctx, "slow")["model_dir"] == model


def test_parse_progress_and_split_lines():
    assert tg_training.parse_progress(
        "Training progress:  12%|#2        | 6000/50000 [02:00<14:40, 50.00it/s, Loss=0.01]") \
        == (6000, 50000)
    assert tg_training.parse_progress("3 of 12 done") == (3, 12)
    assert tg_training.parse_progress("[INFO] ===== extract audio =====") is None
    assert tg_training.parse_progress("0/0 [") is None
    buffer = bytearray()
    assert tg_training.split_lines(buffer, b"a\r 1/4 [x]\r 2/4 [") == ["a", " 1/4 [x]"]
    assert tg_training.split_lines(buffer, b"y]\nrest") == [" 2/4 [y]"]
    assert bytes(buffer) == b"rest"


# --- the writable working copy of a read-only dataset ---------------------------------------------


def test_working_copy_links_inputs_and_copies_what_upstream_rewrites(tmp_path, read_only):
    source = tmp_path / "dataset"
    (source / "ori_imgs").mkdir(parents=True)
    (source / "ori_imgs" / "0.jpg").write_bytes(b"jpg")
    (source / "transforms_train.json").write_text("{}")
    (source / "points3d.ply").write_bytes(b"old ply")
    really = read_only(source)
    before = snapshot(str(source))
    copy = tg_training.WorkingCopy(str(source), str(tmp_path / "work" / "dataset"))
    path = copy.prepare()
    assert os.path.islink(os.path.join(path, "ori_imgs"))
    assert os.readlink(os.path.join(path, "transforms_train.json")) == str(
        source / "transforms_train.json")
    ply = os.path.join(path, "points3d.ply")
    assert not os.path.islink(ply) and open(ply, "rb").read() == b"old ply"
    with open(ply, "wb") as handle:  # upstream's storePly
        handle.write(b"new ply")
    os.makedirs(os.path.join(path, "teeth_mask"))  # create_teeth_mask.py
    np.save(os.path.join(path, "aud_hu.npy"), np.zeros((2, 2, 2)))
    assert copy.prepare() == path  # idempotent; what was written stays
    assert open(ply, "rb").read() == b"new ply"
    assert snapshot(str(source)) == before
    if really:
        with pytest.raises(OSError):
            open(str(source / "points3d.ply"), "wb")


def test_train_a_read_only_dataset_through_a_working_copy(tmp_path, read_only):
    files = make_files(tmp_path, training=True)
    really = read_only(files["data_dir"])
    before = snapshot(files["data_dir"])
    if really:  # upstream's scripts on the dataset itself would fail: the stand-in proves it
        failed = subprocess.run(
            [sys.executable, standins.HERE, "train_mouth.py", "-s", files["data_dir"], "-m",
             str(tmp_path / "direct"), "--audio_extractor", "hubert"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert failed.returncode != 0
    engine = StandinTalkingGaussianEngine(train_env=training_env(TG_STANDIN_STEP_S="0"),
                                          **files)
    engine.load()
    result = engine.train(Recorder().ctx, "obama")  # this daemon's own subject, no video
    assert [(s["stage"], s["skipped"]) for s in result["steps"]] == [
        ("au", True), ("teeth", False), ("audio", False), ("mouth", False), ("face", False),
        ("fuse", False)]
    assert snapshot(files["data_dir"]) == before  # nothing written into the dataset
    copy = result["data_dir"]
    assert copy == os.path.join(files["work_dir"], "train", "data", "obama")
    for name in ("points3d.ply", "teeth_mask", "aud_hu.npy"):  # upstream's writes, real files
        assert os.path.exists(os.path.join(copy, name)) and not os.path.islink(
            os.path.join(copy, name)), name
    for name in ("transforms_train.json", "bc.jpg", "au.csv", "ori_imgs", "torso_imgs"):
        assert os.path.islink(os.path.join(copy, name)), name
    assert os.path.isfile(os.path.join(result["model_dir"], "chkpnt_fuse_latest.pth"))


# --- Python 3.7 ---------------------------------------------------------------------------------


PY37 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.7.*/bin/python")))
DAEMON_FILES = sorted(glob.glob(str(ROOT / "daemons" / "talkinggaussian" / "*.py")))


@pytest.mark.skipif(not PY37, reason="no Python 3.7 interpreter under ~/.pyenv")
def test_daemon_code_compiles_on_python37(tmp_path):
    out = subprocess.run([PY37[-1], "-c", (
        "import os, py_compile, sys\n"
        "for path in sys.argv[2:]:\n"
        "    py_compile.compile(path, cfile=os.path.join(sys.argv[1], os.path.basename(path) + "
        "'c'), doraise=True)\n"), str(tmp_path)] + DAEMON_FILES,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()
    assert len(os.listdir(str(tmp_path))) == len(DAEMON_FILES) == 6


PY37_CHECKS = r"""
import json, os, sys
import numpy as np
from modelhost.daemons.talkinggaussian import audio, dataset, training, video
from modelhost.daemons.talkinggaussian.engine import TalkingGaussianEngine
problems = TalkingGaussianEngine.preflight({"checkout": sys.argv[1], "hubert_dir": sys.argv[1]})
assert problems[0].startswith("TalkingGaussian checkout not found at " + sys.argv[1]), problems
assert audio.hubert_frame_count(16000) == 24
window = audio.feature_window(np.arange(10 * 2, dtype=np.float32).reshape(10, 2, 1), 0)
assert window.shape == (8, 2, 1) and not window[:4].any()
assert audio.deepspeech_windows(np.ones((50, 29)), 16000).shape == (25, 16, 29)
assert training.parse_progress("x: 5%|#| 5/100 [00:01<00:19]") == (5, 100)
assert dataset.camera_sequence(5, 0, 3) == [0, 1, 2, 1, 0]
assert video.Mp4Segmenter().feed(b"\x00\x00\x00\x08ftyp") == []
print(json.dumps({"python": sys.version.split()[0], "numpy": np.__version__}))
"""


@pytest.mark.slow
def test_daemon_code_runs_on_python37(test_venvs, tmp_path):
    python = str(test_venvs["py37"] / "bin" / "python")
    out = subprocess.run([python, "-c", PY37_CHECKS, str(tmp_path / "no-checkout")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout.decode()
    facts = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert facts["python"].startswith("3.7.") and facts["numpy"].startswith("1.")


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_through_modelhost_up(make_host, tmp_path):
    files = make_files(tmp_path)
    options = "{" + ", ".join("{}: {}".format(k, v) for k, v in sorted(files.items())) + "}"
    host = make_host([daemon_yaml(
        "talkinghead", engine="talkinggaussian_standin_engine:StandinTalkingGaussianEngine",
        options=options, max_payload="64MiB", ready_timeout_s=120)]).start()
    host.wait_ready("talkinghead", timeout=120)
    client = host.client()
    progress = []
    result = client.call("talkinghead", "render", audio=wav_bytes(2.0, loud_from=1.0),
                         timeout=120, on_progress=progress.append)
    assert result["frames"] == 49 and result["format"] == "mp4"
    frames, size = decode_frames(result["video"], tmp_path)
    assert len(frames) == 49 and size == (WIDTH, HEIGHT)
    sound = audio_of(result["video"], tmp_path)
    assert sound is not None and abs(len(sound) / 16000.0 - 2.0) < 0.05
    fractions = [p.fraction for p in progress if p.stage == "render"]
    assert len(fractions) >= 2 and fractions[-1] == 1.0
    stream = client.stream("talkinghead", "render", audio=wav_bytes(2.0), timeout=120)
    chunks = list(stream)
    assert chunks[0]["kind"] == "init" and stream.result["format"] == "fmp4"
    whole = b"".join(bytes(c["data"]) for c in chunks)
    frames, _ = decode_frames(whole, tmp_path, "streamed.mp4")
    assert len(frames) == stream.result["frames"] == 49
    row = host.daemon("talkinghead")
    assert row["state"] in ("ready", "busy")


# --- upstream's own classes, on a CPU ------------------------------------------------------------

UPSTREAM_ON_CPU = r"""
import os, sys, types
import numpy as np
import torch

# The compiled CUDA modules upstream imports at module level; nothing here calls them.
rasterizer = types.ModuleType("diff_gaussian_rasterization")
rasterizer.GaussianRasterizationSettings = rasterizer.GaussianRasterizer = object
knn, knn_c = types.ModuleType("simple_knn"), types.ModuleType("simple_knn._C")
knn_c.distCUDA2 = lambda points: torch.ones(len(points))
knn._C = knn_c
sys.modules.update({"diff_gaussian_rasterization": rasterizer, "simple_knn": knn,
                    "simple_knn._C": knn_c, "_gridencoder": types.ModuleType("_gridencoder")})

checkout, root, tests = sys.argv[1:4]
sys.path.insert(0, tests)
from standins import talkinggaussian as standins
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor
from modelhost.daemons.talkinggaussian import audio
from modelhost.daemons.talkinggaussian.engine import TalkingGaussianEngine

data = standins.make_dataset(os.path.join(root, "data", "subject"))
model_dir = standins.make_model(os.path.join(root, "models", "subject"))
hubert_dir = os.path.join(root, "hubert")
config = HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2)
HubertModel(config).save_pretrained(hubert_dir)
Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(
    hubert_dir)

# A fused checkpoint as train_fuse.py saves it, made with upstream's classes.
sys.path.insert(0, checkout)
from argparse import Namespace
from scene.motion_net import MotionNetwork, MouthMotionNetwork
args = Namespace(audio_extractor="hubert", sh_degree=2)
face_net, mouth_net = MotionNetwork(args=args), MouthMotionNetwork(args=args)

def capture(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.nn.Parameter(torch.rand(*shape, generator=g))
    return (2, t(n, 3), t(n, 1, 3), t(n, 8, 3), t(n, 1), t(n, 3), t(n, 4), t(n, 1),
            torch.zeros(n), torch.zeros(n, 1), torch.zeros(n, 1), {"state": {}, "param_groups": []},
            1.0)

face, mouth = capture(40, 0), capture(20, 1)
torch.save((face, face_net.state_dict(), mouth, mouth_net.state_dict()),
           os.path.join(model_dir, "chkpnt_fuse_latest.pth"))

engine = TalkingGaussianEngine(checkout=checkout, data_dir=data, model_dir=model_dir,
                               hubert_dir=hubert_dir, device="cpu",
                               work_dir=os.path.join(root, "work"))
engine.load()
model = engine.model
import scene.cameras, scene.gaussian_model, gaussian_renderer
assert type(model.gaussians) is scene.gaussian_model.GaussianModel
assert model.camera_class is scene.cameras.Camera
assert model.render_face is gaussian_renderer.render_motion
assert model.render_mouth is gaussian_renderer.render_motion_mouth
assert torch.equal(model.gaussians._xyz, face[1].detach())
assert torch.equal(model.gaussians_mouth._rotation, mouth[6].detach())
assert model.gaussians.active_sh_degree == 2 and model.gaussians.get_xyz.shape == (40, 3)
for name, value in face_net.state_dict().items():
    assert torch.equal(model.motion_net.state_dict()[name], value), name
for name, value in mouth_net.state_dict().items():
    assert torch.equal(model.motion_net_mouth.state_dict()[name], value), name
assert not model.motion_net.training and model.background.tolist() == [0.0, 0.0, 0.0]
assert type(model.audio_encoder.model) is HubertModel
# The real HuBERT's output length is the frame count the engine plans with.
for seconds in (1.0, 2.37, 20.5):
    speech = np.sin(np.arange(int(seconds * 16000)) / 5.0).astype(np.float32)
    features = engine._extract(model, speech)
    assert features.shape == (audio.hubert_frame_count(len(speech)), 2, 16), features.shape
engine.offload(); engine.onload(); engine.unload()
print("upstream ok", sum(p.numel() for p in face_net.parameters()),
      sum(p.numel() for p in mouth_net.parameters()))
"""


@pytest.mark.skipif(not os.environ.get("TALKINGGAUSSIAN_CHECKOUT"),
                    reason="set TALKINGGAUSSIAN_CHECKOUT to an upstream checkout at 9bd34f7")
def test_build_model_with_upstream_classes_on_cpu(tmp_path):
    """The real _build_model() and HuBERT loading, with upstream's own Python classes.

    Needs the checkout, and transformers, plyfile and pandas on the host; the
    CUDA extensions are replaced by empty modules (construction and loading
    only: rendering needs CUDA). Runs in its own interpreter: upstream's
    top-level module names (`scene`, `utils`) stay out of the test session.
    """
    for module in ("transformers", "plyfile", "pandas"):
        if not tg_engine._module_found(module):
            pytest.skip("{} is not installed".format(module))
    out = subprocess.run([sys.executable, "-c", UPSTREAM_ON_CPU,
                          os.environ["TALKINGGAUSSIAN_CHECKOUT"], str(tmp_path),
                          str(ROOT / "tests")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()[-4000:]
    assert "upstream ok" in out.stdout.decode()
