"""The chat loop's edges: audio chunks, output sinks (files, a speaker), the microphone, voice activity.

- `AudioChunk`, `VideoSegment`: what the loop hands its sink, one call per piece.
- `FileSink`: per turn `turn-NNN.wav` (written as chunks arrive) and, with a
  talking head, `turn-NNN.mp4` (the sentences' fragmented mp4s, joined by
  ffmpeg at the turn's end; each sentence's own file stays beside it in
  `turn-NNN.video/`).
- `Player`: plays audio chunks as they arrive (`sounddevice`, optional).
- `Microphone`: 16-bit mono frames from the default input (`sounddevice`).
- `VoiceActivity`: an energy detector with an adaptive noise floor that says
  where speech starts and ends in a stream of frames.

`sounddevice` (PortAudio) is optional: without it, playing and the
microphone raise `AudioDeviceError` saying what to install; files and typed
or WAV input work without it.
"""

import array
import collections
import io
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import wave

AudioChunk = collections.namedtuple("AudioChunk", "pcm sample_rate")
AudioChunk.__doc__ = "Mono 16-bit little-endian PCM (bytes) at sample_rate."
VideoSegment = collections.namedtuple("VideoSegment", "data kind index")
VideoSegment.__doc__ = ("A piece of a sentence's fragmented mp4: kind 'init' (ftyp+moov), "
                        "'media' (moof+mdat) or 'index' (mfra); concatenated in order, a "
                        "sentence's pieces are a playable mp4.")


class AudioDeviceError(RuntimeError):
    """No sound device can be used here; the message says why and what to install."""


# --- audio values ---------------------------------------------------------------------


def chunk_of(value):
    """An AudioChunk from a TTS daemon's chunk or result: {"audio", "sample_rate"} where audio
    is s16le bytes (espeak) or a numpy array of floats in [-1, 1] or int16 (CosyVoice)."""
    audio = value.get("audio")
    rate = int(value["sample_rate"])
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return AudioChunk(bytes(audio), rate)
    if type(audio).__name__ == "ndarray":
        import numpy

        samples = numpy.asarray(audio)
        if samples.ndim == 2:
            samples = samples.mean(axis=1)
        if samples.dtype.kind == "f":
            samples = numpy.clip(samples, -1.0, 1.0) * 32767.0
            samples = numpy.round(samples)
        return AudioChunk(samples.astype("<i2").tobytes(), rate)
    raise ValueError("a TTS chunk's audio must be bytes or an array, not {}".format(
        type(audio).__name__))


def wav_bytes(pcm, sample_rate):
    """A mono 16-bit WAV file's bytes around raw PCM."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        wav.writeframes(bytes(pcm))
    return out.getvalue()


def read_wav(path_or_bytes):
    """(pcm s16le mono bytes, sample_rate) of a 16-bit PCM WAV file (channels averaged)."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) \
        else str(path_or_bytes)
    with wave.open(source, "rb") as wav:
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    if width != 2:
        raise ValueError("expected 16-bit PCM WAV, got {}-bit".format(8 * width))
    if channels > 1:
        samples = array.array("h", frames)
        mono = array.array("h", (int(sum(samples[i:i + channels]) / channels)
                                 for i in range(0, len(samples), channels)))
        frames = mono.tobytes()
    return frames, rate


def rms_dbfs(pcm):
    """The RMS level of s16le PCM in dBFS (-inf for digital silence)."""
    samples = array.array("h")
    samples.frombytes(bytes(pcm[:len(pcm) - len(pcm) % 2]))
    if sys.byteorder != "little":
        samples.byteswap()
    if not samples:
        return float("-inf")
    power = sum(s * s for s in samples) / float(len(samples))
    if power <= 0:
        return float("-inf")
    return 10.0 * math.log10(power / (32768.0 ** 2))


# --- sinks --------------------------------------------------------------------------------


class Sink(object):
    """What the loop calls with its output. Every method runs on the loop's thread, under
    the loop's output guard: after `interrupted(turn)` no audio or video of that turn comes."""

    def turn_started(self, turn):
        pass

    def audio(self, turn, sentence, chunk):
        pass

    def video(self, turn, sentence, segment):
        pass

    def interrupted(self, turn):
        pass

    def turn_ended(self, result):
        """The turn is over (done, interrupted or failed): close its files."""

    def close(self):
        pass


class Sinks(Sink):
    """Several sinks, called in order."""

    def __init__(self, sinks):
        self.sinks = [sink for sink in sinks if sink is not None]

    def turn_started(self, turn):
        for sink in self.sinks:
            sink.turn_started(turn)

    def audio(self, turn, sentence, chunk):
        for sink in self.sinks:
            sink.audio(turn, sentence, chunk)

    def video(self, turn, sentence, segment):
        for sink in self.sinks:
            sink.video(turn, sentence, segment)

    def interrupted(self, turn):
        for sink in self.sinks:
            sink.interrupted(turn)

    def turn_ended(self, result):
        for sink in self.sinks:
            sink.turn_ended(result)

    def close(self):
        for sink in self.sinks:
            sink.close()


class FileSink(Sink):
    """turn-NNN.wav per turn, and turn-NNN.mp4 where a talking head made video.

    `files` maps a turn to what was written: {"wav": path, "mp4": path, "video_parts": [...]}.
    """

    def __init__(self, directory, ffmpeg=None):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.ffmpeg = ffmpeg
        self.files = {}
        self._wav = {}  # turn -> (wave writer, rate)
        self._parts = {}  # turn -> {sentence: open file}

    def _name(self, turn, suffix):
        return os.path.join(self.directory, "turn-{:03d}{}".format(turn, suffix))

    def audio(self, turn, sentence, chunk):
        writer = self._wav.get(turn)
        if writer is None:
            path = self._name(turn, ".wav")
            wav = wave.open(path, "wb")
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(chunk.sample_rate)
            writer = self._wav[turn] = (wav, chunk.sample_rate)
            self.files.setdefault(turn, {})["wav"] = path
        wav, rate = writer
        if chunk.sample_rate != rate:
            raise ValueError("turn {}: audio at {} Hz after {} Hz; one TTS daemon speaks at one "
                             "rate".format(turn, chunk.sample_rate, rate))
        wav.writeframes(chunk.pcm)

    def video(self, turn, sentence, segment):
        parts = self._parts.setdefault(turn, {})
        handle = parts.get(sentence)
        if handle is None:
            folder = self._name(turn, ".video")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "{:03d}.mp4".format(sentence))
            handle = parts[sentence] = open(path, "wb")
            self.files.setdefault(turn, {}).setdefault("video_parts", []).append(path)
        handle.write(segment.data)

    def turn_ended(self, result):
        turn = result.turn
        writer = self._wav.pop(turn, None)
        if writer is not None:
            writer[0].close()
        parts = self._parts.pop(turn, {})
        for handle in parts.values():
            handle.close()
        files = self.files.setdefault(turn, {})
        if parts:
            mp4 = self._name(turn, ".mp4")
            problem = join_mp4(files["video_parts"], mp4, self.ffmpeg)
            if problem is None:
                files["mp4"] = mp4
            else:
                files["mp4_problem"] = problem
        result.files.update({key: value for key, value in files.items()})

    def close(self):
        for wav, _ in self._wav.values():
            wav.close()
        for parts in self._parts.values():
            for handle in parts.values():
                handle.close()
        self._wav, self._parts = {}, {}


def find_ffmpeg(configured=None):
    """An ffmpeg executable: the given one, else PATH, else imageio-ffmpeg's; None if none."""
    if configured:
        return configured
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or its binary is missing
        return None


def join_mp4(parts, output, ffmpeg=None):
    """Join mp4 files end to end (ffmpeg's concat demuxer, streams copied). None when done,
    else why not: the parts stay where they are either way."""
    if len(parts) == 1:
        shutil.copyfile(parts[0], output)
        return None
    executable = find_ffmpeg(ffmpeg)
    if executable is None:
        return ("no ffmpeg to join the {} video segments into one file (install ffmpeg or "
                "imageio-ffmpeg); they are in {}".format(len(parts), os.path.dirname(parts[0])))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        for part in parts:
            listing.write("file '{}'\n".format(os.path.abspath(part).replace("'", "'\\''")))
    try:
        run = subprocess.run([executable, "-hide_banner", "-loglevel", "error", "-y", "-f",
                              "concat", "-safe", "0", "-i", listing.name, "-c", "copy",
                              "-movflags", "+faststart", output],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        os.unlink(listing.name)
    if run.returncode != 0:
        return "ffmpeg could not join the video segments: {}".format(
            run.stderr.decode(errors="replace").strip()[-500:])
    return None


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise AudioDeviceError("playing and recording need the sounddevice package: pip install "
                               "sounddevice (and PortAudio: apt-get install libportaudio2)")
    except OSError as exc:  # the package is there, the PortAudio library is not
        raise AudioDeviceError("sounddevice cannot load PortAudio ({}): apt-get install "
                               "libportaudio2, or brew install portaudio".format(exc))
    return sounddevice


class Player(Sink):
    """Plays the audio as it arrives, on the default output device (sounddevice).

    Audio goes to a queue that a thread writes to the device, so the loop never
    waits on the sound card; an interrupt drops what is queued and stops the
    device at once.
    """

    def __init__(self, device=None):
        self._sd = _sounddevice()
        try:
            self._sd.query_devices(device, "output")
        except Exception as exc:
            raise AudioDeviceError("no sound output device here ({})".format(exc))
        self.device = device
        self._queue = queue.Queue()
        self._stream = None
        self._rate = None
        self._generation = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="chat-player", daemon=True)
        self._thread.start()

    def audio(self, turn, sentence, chunk):
        self._queue.put((self._generation, chunk))

    def interrupted(self, turn):
        with self._lock:
            self._generation += 1
            if self._stream is not None:
                self._stream.abort()  # what the device still holds is dropped too
                self._stream.close()
                self._stream = None

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            generation, chunk = item
            with self._lock:
                if generation != self._generation:
                    continue
                if self._stream is None or self._rate != chunk.sample_rate:
                    if self._stream is not None:
                        self._stream.close()
                    self._stream = self._sd.RawOutputStream(
                        samplerate=chunk.sample_rate, channels=1, dtype="int16",
                        device=self.device)
                    self._stream.start()
                    self._rate = chunk.sample_rate
                stream = self._stream
            try:
                stream.write(chunk.pcm)
            except Exception:  # aborted by an interrupt meanwhile
                pass

    def close(self):
        self._queue.put(None)
        self._thread.join(5)
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None


class Microphone(object):
    """16-bit mono frames of `frame_s` seconds from the default input device.

    Iterate it (from one thread) for PCM bytes; close() stops the device.
    """

    def __init__(self, sample_rate=16000, frame_s=0.03, device=None):
        sd = _sounddevice()
        try:
            sd.query_devices(device, "input")
        except Exception as exc:
            raise AudioDeviceError("no microphone here ({})".format(exc))
        self.sample_rate = sample_rate
        self._frames = queue.Queue()
        blocksize = max(1, int(round(sample_rate * frame_s)))
        self._stream = sd.RawInputStream(samplerate=sample_rate, channels=1, dtype="int16",
                                         blocksize=blocksize, device=device,
                                         callback=self._callback)
        self._stream.start()

    def _callback(self, data, frames, time_info, status):
        self._frames.put(bytes(data))

    def __iter__(self):
        while True:
            frame = self._frames.get()
            if frame is None:
                return
            yield frame

    def close(self):
        self._stream.stop()
        self._stream.close()
        self._frames.put(None)


class VoiceActivity(object):
    """Where speech starts and ends in a stream of 16-bit frames: energy against a noise floor.

    `feed(frame)` returns "start" on the frame that confirms speech (after
    `start_s` of it), "end" after `end_silence_s` of quiet following speech,
    else None. A frame is speech when its level is above `threshold_db` dBFS
    and `margin_db` above the noise floor (the quietest recent level, rising
    slowly, so a steady hum is learned and ignored).
    """

    def __init__(self, sample_rate, threshold_db=-45.0, margin_db=12.0, start_s=0.09,
                 end_silence_s=0.6, frame_s=0.03):
        self.sample_rate = sample_rate
        self.threshold_db = threshold_db
        self.margin_db = margin_db
        self.start_s = start_s
        self.end_silence_s = end_silence_s
        self.frame_s = frame_s
        self.rise_db_per_s = 2.0
        self.noise_db = None
        self.speaking = False
        self._voiced_s = 0.0
        self._quiet_s = 0.0

    def feed(self, frame):
        seconds = len(frame) / 2.0 / self.sample_rate
        level = rms_dbfs(frame)
        floored = max(level, -100.0)  # digital silence counts as -100 dBFS
        if self.noise_db is None:
            self.noise_db = floored  # the stream starts with what the room sounds like
        voiced = level > self.threshold_db and level > self.noise_db + self.margin_db
        # The floor follows quieter frames down at once and louder ones up slowly, so a
        # steady hum is learned in seconds while a sentence barely moves it.
        if floored < self.noise_db:
            self.noise_db = floored
        else:
            self.noise_db = min(floored, self.noise_db + self.rise_db_per_s * seconds)
        if not self.speaking:
            self._voiced_s = self._voiced_s + seconds if voiced else 0.0
            if self._voiced_s >= self.start_s:
                self.speaking, self._quiet_s = True, 0.0
                return "start"
            return None
        self._quiet_s = 0.0 if voiced else self._quiet_s + seconds
        if self._quiet_s >= self.end_silence_s:
            self.speaking, self._voiced_s = False, 0.0
            return "end"
        return None


def frames_of(pcm, sample_rate, frame_s=0.03):
    """Split s16le PCM into frames of frame_s seconds (a recording played as a microphone)."""
    step = 2 * max(1, int(round(sample_rate * frame_s)))
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]
