"""Audio in for the speech recognizers: what a client sends, as float32 mono at 16 kHz.

A client sends one of:

- the bytes of an audio file: WAV always (the standard library's `wave`
  reads 8/16/24/32-bit integer PCM); FLAC, OGG, AIFF and float WAV too where
  soundfile is installed in the daemon's venv (it is, in the requirements);
- raw 16-bit little-endian mono PCM bytes, with `sample_rate` (what the
  espeak daemon's `tts` returns, so its result can be passed on as it is);
- a numpy array of int16, int32, float32 or float64 samples with
  `sample_rate`: shape (n,), or (n, channels), which are averaged to mono.

Resampling to 16 kHz goes through soxr where it is installed, else through
the windowed-sinc resampler below (numpy only). Both stream: a resampler is
fed chunk after chunk and gives the same samples as one call on the whole
signal, which the streaming sessions rely on.

Runs on Python 3.7 with numpy (soundfile and soxr optional).
"""

import io
import math
import sys
import wave

import numpy

from modelhost.errors import BadArguments

TARGET_RATE = 16000
RATE_RANGE = (4000, 384000)
MAX_CHANNELS = 16
# Floats beyond this are no [-1, 1] audio but, most often, int16 values as floats.
FLOAT_PEAK_LIMIT = 2.0

_FILE_MAGIC = (
    (b"RIFF", "WAV"), (b"RF64", "WAV"), (b"fLaC", "FLAC"), (b"OggS", "OGG"), (b"FORM", "AIFF"),
)


def _optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None
    except OSError:  # soundfile without its libsndfile
        return None


soundfile = _optional("soundfile")
soxr = _optional("soxr")


def check_rate(value, what, name="sample_rate"):
    """A sample rate as an int; BadArguments unless it is a whole number in RATE_RANGE."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArguments("{}: {} must be a number of samples per second such as 16000, not "
                           "{}".format(what, name, type(value).__name__))
    if isinstance(value, float):
        if not value.is_integer():
            raise BadArguments("{}: {} must be a whole number, not {}".format(what, name, value))
        value = int(value)
    low, high = RATE_RANGE
    if not low <= value <= high:
        raise BadArguments("{}: {} {} is out of range: {} .. {} Hz".format(
            what, name, value, low, high))
    return value


def file_kind(data):
    """'WAV', 'FLAC', ... for the bytes of an audio file, None for anything else."""
    head = bytes(data[:4])
    for magic, kind in _FILE_MAGIC:
        if head == magic:
            if kind == "WAV" and bytes(data[8:12]) != b"WAVE":
                return None
            return kind
    return None


def decode(audio, sample_rate, what):
    """(float32 mono samples, their rate) of a client's audio argument; BadArguments if it
    is not audio. `sample_rate`: None, or the rate the caller says the audio has."""
    if sample_rate is not None:
        sample_rate = check_rate(sample_rate, what)
    if isinstance(audio, (bytes, bytearray, memoryview)):
        data = memoryview(audio).cast("B") if isinstance(audio, memoryview) else audio
        kind = file_kind(data)
        if kind is not None:
            samples, rate = _read_file(bytes(data), kind, what)
            if sample_rate is not None and sample_rate != rate:
                raise BadArguments("{}: wrong rate: the {} file is at {} Hz but sample_rate says "
                                   "{}; leave sample_rate out for a file".format(
                                       what, kind, rate, sample_rate))
            return samples, rate
        if sample_rate is None:
            raise BadArguments(
                "{}: audio is not a WAV or FLAC file (it starts with {!r}); send a file's bytes, "
                "or raw 16-bit little-endian mono PCM with sample_rate".format(
                    what, bytes(data[:8])))
        return pcm16(data, what), sample_rate
    if type(audio).__module__ == "numpy" and isinstance(audio, numpy.ndarray):
        if sample_rate is None:
            raise BadArguments("{}: an array of samples needs sample_rate (samples per "
                               "second)".format(what))
        return from_array(audio, what), sample_rate
    raise BadArguments("{}: audio must be the bytes of a WAV/FLAC file, raw 16-bit PCM bytes with "
                       "sample_rate, or a numpy array with sample_rate; not {}".format(
                           what, type(audio).__name__))


def pcm16(data, what):
    """float32 samples of raw 16-bit little-endian mono PCM."""
    if len(data) % 2:
        raise BadArguments("{}: raw PCM must be 16-bit samples, an even number of bytes; got "
                           "{} bytes".format(what, len(data)))
    return numpy.frombuffer(bytes(data), dtype="<i2").astype(numpy.float32) / 32768.0


def from_array(array, what):
    """float32 mono samples of an int16/int32/float array of shape (n,) or (n, channels)."""
    if array.ndim == 2:
        frames, channels = array.shape
        if channels > MAX_CHANNELS:
            raise BadArguments("{}: an array of shape {} would have {} channels; pass shape "
                               "(samples,) or (samples, channels)".format(
                                   what, tuple(array.shape), channels))
    elif array.ndim != 1:
        raise BadArguments("{}: an array of samples must have shape (samples,) or (samples, "
                           "channels), not {}".format(what, tuple(array.shape)))
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "i" and size == 2:
        samples = array.astype(numpy.float32) / 32768.0
    elif kind == "i" and size == 4:
        samples = (array.astype(numpy.float64) / 2147483648.0).astype(numpy.float32)
    elif kind == "f" and size in (4, 8):
        samples = array.astype(numpy.float32)
        if samples.size:
            if not numpy.isfinite(samples).all():
                raise BadArguments("{}: the samples hold NaN or infinite values".format(what))
            peak = float(numpy.abs(samples).max())
            if peak > FLOAT_PEAK_LIMIT:
                raise BadArguments("{}: float samples must lie in [-1, 1], but the peak is {:g} "
                                   "(int16 values as floats? divide by 32768 or send int16)"
                                   .format(what, peak))
    else:
        raise BadArguments("{}: samples of dtype {} are not supported; send int16, int32, "
                           "float32 or float64".format(what, array.dtype))
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=numpy.float32)
    return numpy.ascontiguousarray(samples, dtype=numpy.float32)


def _read_file(data, kind, what):
    if soundfile is not None:
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError
            raise BadArguments("{}: cannot decode the {} file: {}".format(what, kind, exc))
        return _mono(samples), int(rate)
    if kind != "WAV":
        raise BadArguments("{}: {} needs soundfile in the daemon's venv ({}); send a WAV file, "
                           "or install soundfile there".format(what, kind, sys.prefix))
    return _read_wav(data, what)


def _read_wav(data, what):
    """A PCM WAV through the standard library's wave module."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise BadArguments("{}: cannot decode the WAV file: {} (without soundfile in the "
                           "daemon's venv only integer PCM WAV is read)".format(what, exc))
    if channels < 1 or rate < 1:
        raise BadArguments("{}: the WAV file says {} channels at {} Hz".format(
            what, channels, rate))
    frames = frames[:len(frames) - len(frames) % (width * channels)]
    if width == 1:  # unsigned 8-bit
        samples = (numpy.frombuffer(frames, numpy.uint8).astype(numpy.float32) - 128.0) / 128.0
    elif width == 2:
        samples = numpy.frombuffer(frames, "<i2").astype(numpy.float32) / 32768.0
    elif width == 3:
        raw = numpy.frombuffer(frames, numpy.uint8).reshape(-1, 3).astype(numpy.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        values = numpy.where(values >= 1 << 23, values - (1 << 24), values)
        samples = values.astype(numpy.float32) / float(1 << 23)
    elif width == 4:
        samples = (numpy.frombuffer(frames, "<i4").astype(numpy.float64)
                   / 2147483648.0).astype(numpy.float32)
    else:
        raise BadArguments("{}: WAV samples of {} bytes are not supported".format(what, width))
    return _mono(samples.reshape(-1, channels)), rate


def _mono(samples):
    if samples.shape[1] == 1:
        return numpy.ascontiguousarray(samples[:, 0], dtype=numpy.float32)
    return samples.mean(axis=1, dtype=numpy.float32)


def to_int16_bytes(samples):
    """Little-endian 16-bit PCM bytes of float samples in [-1, 1] (clipped)."""
    scaled = numpy.clip(numpy.round(samples * 32768.0), -32768, 32767)
    return scaled.astype("<i2").tobytes()


# --- resampling ---------------------------------------------------------------------


def resampler(source_rate, target_rate=TARGET_RATE, prefer_soxr=True):
    """A streaming resampler: feed(chunk) -> samples so far, finish() -> the rest."""
    if source_rate == target_rate:
        return _Identity()
    if prefer_soxr and soxr is not None:
        return _SoxrResampler(source_rate, target_rate)
    return NumpyResampler(source_rate, target_rate)


def resample(samples, source_rate, target_rate=TARGET_RATE, prefer_soxr=True):
    """The whole signal at target_rate."""
    stream = resampler(source_rate, target_rate, prefer_soxr)
    head = stream.feed(samples)
    tail = stream.finish()
    return numpy.concatenate([head, tail]) if len(tail) else head


class _Identity(object):
    name = "none"

    def feed(self, samples):
        return numpy.asarray(samples, dtype=numpy.float32)

    def finish(self):
        return numpy.zeros(0, numpy.float32)


class _SoxrResampler(object):
    name = "soxr"

    def __init__(self, source_rate, target_rate):
        self._stream = soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32",
                                           quality="HQ")

    def feed(self, samples):
        return self._stream.resample_chunk(numpy.asarray(samples, dtype=numpy.float32))

    def finish(self):
        return self._stream.resample_chunk(numpy.zeros(0, numpy.float32), last=True)


class NumpyResampler(object):
    """Band-limited interpolation with a Kaiser-windowed sinc, in numpy alone.

    Output sample n sits at input position n * source/target; its value sums
    the input around that position weighted by the low-pass kernel (cut off
    just below the lower of the two Nyquist frequencies), normalized so that
    a constant stays constant. The input before the first sample and after
    the last is zero. Fed in chunks, it keeps the last `half` input samples
    of context, so the chunks give exactly the samples of one whole call.
    """

    name = "numpy"
    ZERO_CROSSINGS = 10  # kernel half-width, in zero crossings of the low-pass sinc
    BETA = 7.0  # Kaiser window shape: ~70 dB stop band
    BLOCK = 4096  # outputs computed at once: bounds the temporary arrays

    def __init__(self, source_rate, target_rate):
        self.step = float(source_rate) / float(target_rate)  # input samples per output sample
        self.ratio = float(target_rate) / float(source_rate)
        self.cutoff = min(1.0, self.ratio) * 0.95  # of the input's Nyquist frequency
        self.half = int(math.ceil(self.ZERO_CROSSINGS / self.cutoff))
        self._taps = numpy.arange(-self.half + 1, self.half + 1)
        # Input kept for context: _buffer[i] is input sample _offset + i; zeros before 0.
        self._buffer = numpy.zeros(self.half, numpy.float32)
        self._offset = -self.half
        self._received = 0  # input samples fed so far
        self._next = 0  # index of the next output sample
        self._finished = False

    def feed(self, samples):
        if self._finished:
            raise RuntimeError("the resampler was finished")
        samples = numpy.asarray(samples, dtype=numpy.float32)
        self._buffer = numpy.concatenate([self._buffer, samples])
        self._received += len(samples)
        # Outputs whose kernel lies within the input received so far: the last
        # input sample a kernel at position p reads is floor(p) + half.
        last = int(math.floor((self._received - 1 - self.half) / self.step))
        return self._produce(last + 1)

    def finish(self):
        if self._finished:
            return numpy.zeros(0, numpy.float32)
        self._finished = True
        total = int(round(self._received * self.ratio))
        self._buffer = numpy.concatenate([self._buffer, numpy.zeros(self.half + 1,
                                                                    numpy.float32)])
        return self._produce(total)

    def _produce(self, stop):
        """Output samples self._next .. stop - 1, then drop the input no longer needed."""
        start = self._next
        if stop <= start:
            return numpy.zeros(0, numpy.float32)
        out = numpy.empty(stop - start, numpy.float32)
        for first in range(start, stop, self.BLOCK):
            indices = numpy.arange(first, min(stop, first + self.BLOCK), dtype=numpy.float64)
            positions = indices * self.step
            base = numpy.floor(positions).astype(numpy.int64)
            columns = base[:, None] + self._taps[None, :]
            distance = positions[:, None] - columns
            weights = self._kernel(distance)
            values = self._buffer[columns - self._offset]
            out[first - start:first - start + len(indices)] = (
                (values * weights).sum(axis=1) / weights.sum(axis=1))
        self._next = stop
        keep_from = int(math.floor(self._next * self.step)) - self.half
        if keep_from > self._offset:
            self._buffer = self._buffer[keep_from - self._offset:]
            self._offset = keep_from
        return out

    def _kernel(self, distance):
        x = distance / self.half
        window = numpy.i0(self.BETA * numpy.sqrt(numpy.clip(1.0 - x * x, 0.0, 1.0)))
        window /= numpy.i0(self.BETA)
        return numpy.sinc(self.cutoff * distance) * window
