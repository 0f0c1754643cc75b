"""Prompt audio for CosyVoice2: decode bytes, check them, downmix, resample, write.

Clients send a voice prompt as the bytes of an audio file (WAV, FLAC,
OGG/Vorbis; MP3 where the bundled libsndfile is 1.1 or newer), never as a path
on the daemon's disk. `decode_prompt` turns those bytes into the engine's
canonical prompt: mono float32 at min(source rate, 24 kHz).

Why that canonical form, at the pinned upstream commit (see README.md):
- upstream reads the prompt from a file itself (`load_wav` in
  cosyvoice/utils/file_utils.py), once at 16 kHz (speech tokens, speaker
  embedding) and once at 24 kHz (the flow's prompt mel), and averages its
  channels. Handing it 16 kHz audio would make it upsample that for the 24 kHz
  features; handing it more than 24 kHz only costs memory and temp-file size.
  (The prompt mel stops at 8 kHz anyway: fmax 8000 in cosyvoice2.yaml.)
- channels are averaged to mono, as upstream does; a stereo prompt is accepted.

`resample` is a windowed-sinc (Kaiser) polyphase resampler for any pair of
integer rates, written here so that the daemon needs nothing beyond numpy for
it and so that its behaviour is pinned by our tests.

numpy is imported at the top; soundfile only where a file is read or written.
"""

import io
import math

import numpy

# Upstream's limits: `load_wav(..., min_sr=16000)` refuses lower rates, and the
# speech tokenizer refuses prompts longer than 30 s (frontend._extract_speech_token).
MIN_PROMPT_RATE = 16000
MAX_PROMPT_SECONDS = 30.0
# Shorter prompts give the speech tokenizer and the speaker model next to
# nothing to work with (a dozen 25 Hz tokens): refused with a clear message
# rather than failing deep inside upstream.
MIN_PROMPT_SECONDS = 0.5
# The highest rate upstream reads a prompt at (the model's own output rate).
MAX_STORED_RATE = 24000


class AudioError(ValueError):
    """Bytes that are not a usable prompt; the message says what is wrong, for people."""


class Prompt(object):
    """A decoded voice prompt: mono float32 samples at `sample_rate`."""

    __slots__ = ("samples", "sample_rate", "source_rate", "source_channels")

    def __init__(self, samples, sample_rate, source_rate=None, source_channels=1):
        self.samples = samples
        self.sample_rate = int(sample_rate)
        self.source_rate = int(source_rate or sample_rate)
        self.source_channels = int(source_channels)

    @property
    def duration_s(self):
        return len(self.samples) / float(self.sample_rate)


def decode_prompt(data, max_seconds=MAX_PROMPT_SECONDS, min_seconds=MIN_PROMPT_SECONDS,
                  min_rate=MIN_PROMPT_RATE, max_stored_rate=MAX_STORED_RATE):
    """Bytes of an audio file -> Prompt (mono float32, at most `max_stored_rate`).

    AudioError when the bytes are empty or undecodable, the rate is under
    `min_rate`, the audio is shorter than `min_seconds` or longer than
    `max_seconds`, or a sample is not finite.
    """
    import soundfile

    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise AudioError("expected the bytes of an audio file (WAV, FLAC, OGG), not {}".format(
            type(data).__name__))
    if not data:
        raise AudioError("is empty: expected the bytes of an audio file (WAV, FLAC, OGG)")
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except Exception as exc:  # libsndfile says why in its own words
        raise AudioError("cannot decode {} bytes as audio (WAV, FLAC, OGG): {}".format(
            len(data), _one_line(exc)))
    with sound:
        rate, frames, channels = int(sound.samplerate), int(sound.frames), int(sound.channels)
        # Checked before the samples are read: a long file is refused without decoding it.
        if rate < min_rate:
            raise AudioError("sample rate is {} Hz; CosyVoice2 needs at least {} Hz (record or "
                             "export the prompt at 16 kHz or more; upsampling does not add what "
                             "is missing)".format(rate, min_rate))
        duration = frames / float(rate)
        if duration > max_seconds:
            raise AudioError("is {:.2f} s long; the limit is {:g} s (upstream's speech tokenizer "
                             "takes at most 30 s): trim it to one or two sentences".format(
                                 duration, max_seconds))
        if duration < min_seconds:
            raise AudioError("is {:.2f} s long; a prompt needs at least {:g} s of speech".format(
                duration, min_seconds))
        try:
            samples = sound.read(frames, dtype="float32", always_2d=True)
        except Exception as exc:
            raise AudioError("cannot decode {} bytes as audio: {}".format(
                len(data), _one_line(exc)))
    mono = samples.mean(axis=1, dtype=numpy.float64) if channels > 1 else samples[:, 0]
    if not numpy.all(numpy.isfinite(mono)):
        raise AudioError("has samples that are not finite numbers (NaN or infinity)")
    stored_rate = min(rate, max_stored_rate)
    mono = resample(mono, rate, stored_rate)
    return Prompt(mono, stored_rate, source_rate=rate, source_channels=channels)


def read_prompt_file(path, **limits):
    """decode_prompt() of a file's bytes (the warm-up prompt, stored voices)."""
    with open(path, "rb") as handle:
        return decode_prompt(handle.read(), **limits)


def write_wav(path, samples, sample_rate):
    """Mono float32 samples -> a 32-bit float WAV file (no quantization on the way to upstream)."""
    import soundfile

    soundfile.write(path, numpy.asarray(samples, dtype=numpy.float32), int(sample_rate),
                    format="WAV", subtype="FLOAT")


def resample(samples, from_rate, to_rate, zero_crossings=16, rolloff=0.945, beta=8.6):
    """1-D samples at `from_rate` -> float32 samples at `to_rate`.

    Band-limited interpolation with a Kaiser-windowed sinc: the low-pass sits
    at `rolloff` times the lower of the two Nyquist frequencies, and the window
    spans `zero_crossings` zero crossings of the sinc on each side. Output
    sample j sits at input time j * from_rate / to_rate (no delay), and there
    are ceil(len * to_rate / from_rate) of them. Each of the filter's phases is
    normalized to unit gain, so a constant stays exactly that constant away
    from the edges.

    With g = gcd(from_rate, to_rate), up = to_rate / g and down = from_rate / g,
    output j = q * up + p needs input samples around q * down + p * down / up:
    one row of `down + 2W + 1` inputs (a strided view, no copy) times a
    (phases x taps) kernel gives `up` outputs. Rows go in blocks, so memory
    stays bounded for long inputs and large ratios.
    """
    from_rate, to_rate = int(from_rate), int(to_rate)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError("sample rates must be positive, not {} and {}".format(from_rate, to_rate))
    x = numpy.asarray(samples, dtype=numpy.float64)
    if x.ndim != 1:
        raise ValueError("resample takes 1-D samples, not shape {}".format(x.shape))
    if from_rate == to_rate:
        return x.astype(numpy.float32)
    divisor = math.gcd(from_rate, to_rate)
    up, down = to_rate // divisor, from_rate // divisor
    n_out = -(-len(x) * up // down)  # ceil
    if n_out == 0:
        return numpy.zeros(0, dtype=numpy.float32)

    # Low-pass cutoff in cycles per input sample, and the window's half width in input samples.
    cutoff = 0.5 * rolloff * min(1.0, up / float(down))
    half_width = zero_crossings / (2.0 * cutoff)
    reach = int(math.ceil(half_width))
    taps = down + 2 * reach + 1
    # kernel[p, m]: weight of input (q * down - reach + m) for output (q * up + p).
    offsets = (numpy.arange(up)[:, None] * down / float(up)) - (numpy.arange(taps)[None, :] - reach)
    inside = numpy.abs(offsets) < half_width
    ratio = numpy.where(inside, offsets / half_width, 0.0)
    window = numpy.where(inside, numpy.i0(beta * numpy.sqrt(1.0 - ratio * ratio)) / numpy.i0(beta),
                         0.0)
    kernel = 2.0 * cutoff * numpy.sinc(2.0 * cutoff * offsets) * window
    kernel /= kernel.sum(axis=1, keepdims=True)

    rows = -(-n_out // up)
    needed = (rows - 1) * down + taps
    padded = numpy.zeros(max(needed, reach + len(x)), dtype=numpy.float64)
    padded[reach:reach + len(x)] = x
    windows = numpy.lib.stride_tricks.sliding_window_view(padded, taps)[::down][:rows]
    out = numpy.empty((rows, up), dtype=numpy.float64)
    block = max(1, (1 << 22) // (taps * 8))  # ~4 MiB of window rows at a time
    for start in range(0, rows, block):
        out[start:start + block] = windows[start:start + block] @ kernel.T
    return out.reshape(-1)[:n_out].astype(numpy.float32)


def _one_line(exc):
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
