"""Audio for /v1/audio/speech: daemon chunks to 16-bit PCM, and the response formats.

Which formats stream, and which are encoded after the synthesis:

| format | how | streams |
| --- | --- | --- |
| wav  | a RIFF header whose size fields are the streaming maximum, then PCM | yes, chunk by chunk |
| pcm  | raw s16le at `pcm_rate` (24 kHz, as OpenAI's), resampled by soxr | yes, chunk by chunk |
| mp3  | LAME through libsndfile (>= 1.1), constant bitrate | yes, frame by frame |
| opus | Ogg Opus through libsndfile at 24 kHz | yes, an Ogg page (about 1 s) at a time |
| flac | libsndfile | no: sent whole when the synthesis ends |

A stream cannot go back to fill in lengths it did not know. Readers of wav
take the header's maximum as "to the end of the data"; mp3 is encoded at a
constant bitrate so that readers that work out its length from its size
(libsndfile's mpg123) get it right. FLAC is not streamed because libsndfile
cannot read a FLAC whose header has no sample count (`Internal psf_fseek()
failed`), and its output would then be unreadable by soundfile, the usual
Python reader.
"""

import struct

FORMATS = ("wav", "mp3", "opus", "flac", "pcm")
MEDIA_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus",
               "flac": "audio/flac", "pcm": "audio/pcm"}
# libsndfile's Opus encoder takes only these rates.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
OPUS_RATE = 24000
# LAME at a constant bitrate: 0.5 is about 80 kbit/s for 22 kHz mono speech.
MP3_COMPRESSION_LEVEL = 0.5
_STREAM_MAX = 0xFFFFFFFF


def pcm16_of(chunk):
    """(s16le bytes, sample_rate, channels) of a TTS daemon's chunk or result.

    The audio is int16 little-endian bytes (espeak: format "s16le"), float32
    bytes (format "float32"), or a numpy array (CosyVoice: float32 in [-1, 1]).
    """
    if not isinstance(chunk, dict) or "audio" not in chunk or "sample_rate" not in chunk:
        raise ValueError("the daemon's chunk has no audio and sample_rate: {!r}".format(
            sorted(chunk) if isinstance(chunk, dict) else type(chunk).__name__))
    audio, rate = chunk["audio"], int(chunk["sample_rate"])
    channels = int(chunk.get("channels") or 1)
    if type(audio).__name__ == "ndarray":
        if audio.ndim == 2:
            channels = audio.shape[1]
        return _to_s16(audio), rate, channels
    fmt = chunk.get("format") or "s16le"
    if fmt == "s16le":
        return bytes(audio), rate, channels
    if fmt == "float32":
        import numpy

        return _to_s16(numpy.frombuffer(audio, dtype="<f4")), rate, channels
    raise ValueError("the daemon's audio format {!r} is not s16le or float32".format(fmt))


def _to_s16(samples):
    import numpy

    if samples.dtype.kind == "f":
        samples = numpy.clip(samples, -1.0, 1.0) * 32767.0
        return numpy.rint(samples).astype("<i2").tobytes()
    if samples.dtype == numpy.int16:
        return samples.astype("<i2", copy=False).tobytes()
    raise ValueError("the daemon's audio dtype {} is not float or int16".format(samples.dtype))


def wav_header(rate, channels, data_bytes=None):
    """A PCM16 WAV header; without data_bytes, its sizes are the streaming maximum."""
    data = _STREAM_MAX if data_bytes is None else data_bytes
    riff = _STREAM_MAX if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2,
                          channels * 2, 16)
            + b"data" + struct.pack("<I", data))


class _Resampler(object):
    """int16 PCM from one rate to another, chunk by chunk (soxr's streaming resampler)."""

    def __init__(self, source, target, channels):
        import soxr

        self.channels = channels
        self.stream = soxr.ResampleStream(source, target, channels, dtype="int16")

    def feed(self, pcm, last=False):
        import numpy

        samples = numpy.frombuffer(pcm, dtype="<i2")
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels)
        return self.stream.resample_chunk(samples, last=last).astype("<i2").tobytes()


class Encoder(object):
    """One response's audio: start() with the first chunk's format, feed() each chunk,
    finish() at the end; each returns the bytes to send now (b"" for none yet)."""

    streams = True

    def start(self, rate, channels):
        return b""

    def feed(self, pcm):
        raise NotImplementedError

    def finish(self):
        return b""


class WavEncoder(Encoder):
    def start(self, rate, channels):
        return wav_header(rate, channels)

    def feed(self, pcm):
        return pcm


class PcmEncoder(Encoder):
    def __init__(self, rate=None):
        self.rate = rate  # None: the daemon's own
        self.resampler = None

    def start(self, rate, channels):
        if self.rate is not None and self.rate != rate:
            self.resampler = _Resampler(rate, self.rate, channels)
        return b""

    def feed(self, pcm):
        return self.resampler.feed(pcm) if self.resampler is not None else pcm

    def finish(self):
        return self.resampler.feed(b"", last=True) if self.resampler is not None else b""


class _Sink(object):
    """A file for libsndfile to write into, whose bytes leave as they are written.

    libsndfile seeks back at close to fill in lengths (FLAC's STREAMINFO, LAME's
    info frame); bytes that already left cannot change, so those rewrites are
    dropped there. Bytes not yet taken are rewritten as usual.
    """

    def __init__(self):
        self.buffer = bytearray()
        self.position = 0
        self.sent = 0  # bytes taken so far: these are final

    def write(self, data):
        data = bytes(data)
        size = len(data)
        if self.position < self.sent:
            skip = min(size, self.sent - self.position)
            self.position += skip
            data = data[skip:]
        end = self.position + len(data)
        if end > len(self.buffer):
            self.buffer.extend(bytes(end - len(self.buffer)))
        self.buffer[self.position:end] = data
        self.position = end
        return size

    def seek(self, offset, whence=0):
        if whence == 0:
            self.position = offset
        elif whence == 1:
            self.position += offset
        else:
            self.position = len(self.buffer) + offset
        return self.position

    def tell(self):
        return self.position

    def read(self, size=-1):
        end = len(self.buffer) if size < 0 else self.position + size
        out = bytes(self.buffer[self.position:end])
        self.position += len(out)
        return out

    def take(self):
        out = bytes(self.buffer[self.sent:])
        self.sent = len(self.buffer)
        return out


class SoundfileEncoder(Encoder):
    """mp3, opus and flac through libsndfile (soundfile)."""

    KINDS = {
        "mp3": ("MP3", "MPEG_LAYER_III", True),
        "opus": ("OGG", "OPUS", True),
        "flac": ("FLAC", "PCM_16", False),
    }

    def __init__(self, kind):
        self.format, self.subtype, self.streams = self.KINDS[kind]
        self.kind = kind
        self.file = None
        self.sink = _Sink()
        self.resampler = None
        self.channels = 1

    def start(self, rate, channels):
        import soundfile

        self.channels = channels
        options = {}
        if self.kind == "opus" and rate not in OPUS_RATES:
            self.resampler = _Resampler(rate, OPUS_RATE, channels)
            rate = OPUS_RATE
        if self.kind == "mp3":
            options = {"bitrate_mode": "CONSTANT", "compression_level": MP3_COMPRESSION_LEVEL}
        self.file = soundfile.SoundFile(self.sink, "w", samplerate=rate, channels=channels,
                                        format=self.format, subtype=self.subtype, **options)
        return self._out()

    def feed(self, pcm):
        if self.resampler is not None:
            pcm = self.resampler.feed(pcm)
        self._write(pcm)
        return self._out()

    def finish(self):
        if self.resampler is not None:
            self._write(self.resampler.feed(b"", last=True))
        self.file.close()
        return self.sink.take()

    def _write(self, pcm):
        import numpy

        if pcm:
            samples = numpy.frombuffer(pcm, dtype="<i2")
            self.file.write(samples.reshape(-1, self.channels) if self.channels > 1 else samples)

    def _out(self):
        return self.sink.take() if self.streams else b""

    def close(self):
        if self.file is not None and not self.file.closed:
            try:
                self.file.close()
            except Exception:  # an abandoned response: nothing to report to
                pass


def encoder_for(response_format, pcm_rate):
    if response_format == "wav":
        return WavEncoder()
    if response_format == "pcm":
        return PcmEncoder(pcm_rate)
    return SoundfileEncoder(response_format)


def missing_for(response_format, pcm_rate):
    """What this format needs that is not installed here, or None."""
    needs = []
    if response_format in SoundfileEncoder.KINDS:
        needs += ["soundfile", "numpy"]
    if response_format in ("pcm", "opus") and (response_format == "opus" or pcm_rate):
        needs += ["soxr", "numpy"]
    missing = []
    for module in dict.fromkeys(needs):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing or None
