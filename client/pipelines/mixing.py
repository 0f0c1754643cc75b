"""Mixing for the audio drama: plain functions on numpy arrays of float32 frames.

Audio here is float32, shape (frames, channels); a 1-D array is mono. Levels
are dB (dBFS for peaks, LUFS for loudness, ITU-R BS.1770-4 by pyloudnorm),
times are seconds. Resampling is soxr's (its "HQ" quality).

- `resample`, `as_frames`, `to_stereo` (equal-power pan), `place`;
- `loudness` and `normalize_loudness` (a clip shorter than the 400 ms gating
  block is measured looped to one block, so short effects get a level too);
- `fade`, `loop_to_length` (equal-power crossfades at the seams), `trim_silence`;
- `duck_gain`: a sidechain envelope (speech present -> -depth dB) with
  look-ahead, attack, hold and release;
- `true_peak` (4x oversampled) and `limit`, a look-ahead limiter whose gain
  never lets the true peak over the ceiling.

Needs numpy, soxr and pyloudnorm (the `pipelines` extra).
"""

import math

import numpy

__all__ = ["db_to_gain", "gain_to_db", "as_frames", "resample", "to_stereo", "place",
           "loudness", "normalize_loudness", "fade", "loop_to_length", "trim_silence",
           "duck_gain", "true_peak", "true_peak_db", "limit"]

SILENCE_LUFS = -70.0  # BS.1770's absolute gate: anything below measures as silence
BLOCK_S = 0.4  # BS.1770's gating block


def _need(module, package):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError("the audio pipeline needs {0}: pip install {0} (or "
                          "modelhost[pipelines])".format(package))


def db_to_gain(db):
    return 10.0 ** (db / 20.0)


def gain_to_db(gain):
    return 20.0 * math.log10(gain) if gain > 0 else float("-inf")


def as_frames(samples):
    """float32, shape (frames, channels); a 1-D input becomes one channel."""
    array = numpy.asarray(samples, dtype=numpy.float32)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError("audio must be 1-D or (frames, channels), not shape {}".format(
            array.shape))
    return array


def resample(samples, from_rate, to_rate):
    """The frames at `to_rate` (soxr, HQ); the same array when the rates match."""
    frames = as_frames(samples)
    if int(from_rate) == int(to_rate) or len(frames) == 0:
        return frames
    soxr = _need("soxr", "soxr")
    out = soxr.resample(frames, int(from_rate), int(to_rate), quality="HQ")
    return numpy.ascontiguousarray(as_frames(out), dtype=numpy.float32)


def to_stereo(samples, pan=0.0):
    """Two channels. Mono is placed by an equal-power pan law (-1 left, 0 centre at
    -3 dB per side, 1 right); stereo passes through; more channels are averaged down
    to mono first."""
    frames = as_frames(samples)
    if frames.shape[1] == 2:
        return frames
    mono = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    angle = (min(1.0, max(-1.0, float(pan))) + 1.0) * math.pi / 4.0
    return numpy.stack([mono * math.cos(angle), mono * math.sin(angle)], axis=1).astype(
        numpy.float32)


def place(track, clip, start):
    """Add `clip` into `track` from frame `start` (clipped to the track); in place."""
    start = int(start)
    if start >= len(track) or start + len(clip) <= 0:
        return track
    begin = max(0, -start)
    end = min(len(clip), len(track) - start)
    track[start + begin:start + end] += clip[begin:end]
    return track


def loudness(samples, rate):
    """Integrated loudness in LUFS (-inf for silence). A clip shorter than one
    400 ms gating block is measured looped to a block's length."""
    pyloudnorm = _need("pyloudnorm", "pyloudnorm")
    frames = as_frames(samples).astype(numpy.float64)
    if len(frames) == 0 or not numpy.any(frames):
        return float("-inf")
    block = int(math.ceil(BLOCK_S * rate)) + 1
    if len(frames) < block:
        frames = numpy.tile(frames, (int(math.ceil(block / float(len(frames)))), 1))
    with numpy.errstate(divide="ignore"):
        value = pyloudnorm.Meter(rate).integrated_loudness(frames)
    return float(value) if value > SILENCE_LUFS else float("-inf")


def normalize_loudness(samples, rate, target_lufs):
    """(frames at `target_lufs`, the gain applied in dB); silence is returned as is."""
    frames = as_frames(samples)
    measured = loudness(frames, rate)
    if not math.isfinite(measured):
        return frames, 0.0
    gain_db = target_lufs - measured
    return (frames * numpy.float32(db_to_gain(gain_db))).astype(numpy.float32), gain_db


def _curve(n, rising):
    """n points of an equal-power (quarter sine) ramp from 0 to 1 (or 1 to 0)."""
    if n <= 0:
        return numpy.zeros(0, dtype=numpy.float32)
    ramp = numpy.sin(numpy.linspace(0.0, math.pi / 2.0, n, dtype=numpy.float64))
    return (ramp if rising else ramp[::-1]).astype(numpy.float32)


def fade(samples, rate, fade_in_s=0.0, fade_out_s=0.0):
    """A copy with equal-power fades in and out (each at most half the clip)."""
    frames = as_frames(samples).copy()
    half = len(frames) // 2
    n_in = min(half, int(round(fade_in_s * rate)))
    n_out = min(half, int(round(fade_out_s * rate)))
    if n_in:
        frames[:n_in] *= _curve(n_in, True)[:, None]
    if n_out:
        frames[len(frames) - n_out:] *= _curve(n_out, False)[:, None]
    return frames


def loop_to_length(samples, rate, frames_wanted, crossfade_s=0.5):
    """`frames_wanted` frames: the clip cut, or repeated with equal-power crossfades at
    the seams (each crossfade at most half the clip)."""
    clip = as_frames(samples)
    frames_wanted = int(frames_wanted)
    if frames_wanted <= len(clip) or len(clip) == 0:
        if len(clip) == 0:
            return numpy.zeros((frames_wanted, clip.shape[1]), dtype=numpy.float32)
        return clip[:frames_wanted].copy()
    overlap = min(len(clip) // 2, int(round(crossfade_s * rate)))
    rising, falling = _curve(overlap, True)[:, None], _curve(overlap, False)[:, None]
    out = numpy.zeros((frames_wanted + len(clip), clip.shape[1]), dtype=numpy.float32)
    out[:len(clip)] = clip
    end = len(clip)
    while end < frames_wanted:
        start = end - overlap
        if overlap:
            out[start:end] *= falling
            out[start:end] += clip[:overlap] * rising
        out[end:end + len(clip) - overlap] = clip[overlap:]
        end = start + len(clip)
    return out[:frames_wanted].copy()


def trim_silence(samples, rate, threshold_db=-60.0, keep_s=0.02):
    """(the clip without leading and trailing silence, frames cut at the start).

    Silence is below `threshold_db` relative to the clip's own peak; `keep_s`
    of it stays on each side. An all-silent clip is returned whole.
    """
    frames = as_frames(samples)
    level = numpy.abs(frames).max(axis=1) if len(frames) else numpy.zeros(0)
    peak = float(level.max()) if len(level) else 0.0
    if peak <= 0.0:
        return frames, 0
    loud = numpy.nonzero(level > peak * db_to_gain(threshold_db))[0]
    keep = int(round(keep_s * rate))
    first = max(0, int(loud[0]) - keep)
    last = min(len(frames), int(loud[-1]) + 1 + keep)
    return frames[first:last], first


def duck_gain(sidechain, rate, depth_db=10.0, threshold_db=-45.0, attack_s=0.08,
              release_s=0.4, hold_s=0.15, lookahead_s=None, hop_s=0.005):
    """Per-frame linear gain (1-D float32, len(sidechain)) that ducks by `depth_db`
    wherever the sidechain (the dialogue) is above `threshold_db` dBFS RMS.

    The detector reads 20 ms RMS windows centred every `hop_s` (so it hears
    the key up to 10 ms early). The gain falls at
    depth/attack_s dB per second and rises at depth/release_s, linear in dB,
    and stays down for `hold_s` after the key falls silent (so the gaps between
    words do not pump). `lookahead_s` (default: attack_s) starts the fall that
    much before the key: fully ducked when the first word begins.
    """
    key = as_frames(sidechain).astype(numpy.float64)
    n = len(key)
    if n == 0:
        return numpy.ones(0, dtype=numpy.float32)
    lookahead_s = attack_s if lookahead_s is None else lookahead_s
    hop = max(1, int(round(hop_s * rate)))
    window = max(hop, int(round(0.02 * rate)))
    power = (key ** 2).mean(axis=1)
    cumulative = numpy.concatenate([[0.0], numpy.cumsum(power)])
    centres = numpy.arange(0, n, hop)
    starts = numpy.maximum(centres - window // 2, 0)
    ends = numpy.minimum(centres + window // 2 + 1, n)
    rms = numpy.sqrt((cumulative[ends] - cumulative[starts]) / (ends - starts))
    active = rms > db_to_gain(threshold_db)
    # Hold after, look-ahead before: widen each active stretch.
    hold, ahead = int(round(hold_s / hop_s)), int(round(lookahead_s / hop_s))
    widened = active.copy()
    for shift in range(1, hold + 1):
        widened[shift:] |= active[:-shift]
    for shift in range(1, ahead + 1):
        widened[:-shift] |= active[shift:]
    down = depth_db * hop_s / max(attack_s, hop_s)
    up = depth_db * hop_s / max(release_s, hop_s)
    gain_db = numpy.empty(len(widened))
    level = 0.0
    for i, on in enumerate(widened):
        target = -depth_db if on else 0.0
        if level > target:
            level = max(target, level - down)
        elif level < target:
            level = min(target, level + up)
        gain_db[i] = level
    per_frame = numpy.interp(numpy.arange(n), centres, gain_db)
    return (10.0 ** (per_frame / 20.0)).astype(numpy.float32)


def _peak_envelope(frames, oversample=4, chunk=1 << 16, margin=64):
    """Per frame: the largest |sample| of any channel at the frame or between it and
    the next, read from a band-limited `oversample`x upsampling (the true peak)."""
    n = len(frames)
    peaks = numpy.abs(frames).max(axis=1).astype(numpy.float64) if n else numpy.zeros(0)
    if oversample <= 1 or n == 0:
        return peaks
    soxr = _need("soxr", "soxr")
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lo, hi = max(0, start - margin), min(n, stop + margin)
        piece = numpy.zeros((hi - lo + 2 * margin, frames.shape[1]), dtype=numpy.float64)
        piece[margin:margin + hi - lo] = frames[lo:hi]
        up = soxr.resample(piece, 1, oversample, quality="VHQ")
        up = numpy.abs(as_frames(up)).max(axis=1)
        usable = (len(up) // oversample) * oversample
        per_frame = up[:usable].reshape(-1, oversample).max(axis=1)
        offset = margin + (start - lo)
        section = per_frame[offset:offset + (stop - start)]
        peaks[start:start + len(section)] = numpy.maximum(peaks[start:start + len(section)],
                                                          section)
    return peaks


def true_peak(samples, oversample=4):
    """The true peak (linear) of the frames: 4x oversampled, as BS.1770's meter."""
    frames = as_frames(samples)
    return float(_peak_envelope(frames, oversample).max()) if len(frames) else 0.0


def true_peak_db(samples, oversample=4):
    return gain_to_db(true_peak(samples, oversample))


def _sliding_min_forward(values, size):
    """out[n] = min(values[n : n + size]) (fewer at the end): doubling spans, then one
    shifted minimum for the rest."""
    out = values.copy()
    span = 1
    while span * 2 <= size:
        shifted = numpy.full_like(out, numpy.inf)
        shifted[:-span] = out[span:]
        out = numpy.minimum(out, shifted)
        span *= 2
    rest = size - span
    if rest:
        shifted = numpy.full_like(out, numpy.inf)
        shifted[:-rest] = out[rest:]
        out = numpy.minimum(out, shifted)
    return out


def _limiter_gain(frames, rate, ceiling, lookahead_s, release_s, oversample):
    """Per frame, the limiter's gain: never above what the frame's true peak needs."""
    peaks = _peak_envelope(frames, oversample)
    needed = numpy.minimum(1.0, ceiling / numpy.maximum(peaks, 1e-12))
    if numpy.all(needed >= 1.0):
        gain = numpy.ones(len(frames))
    else:
        size = max(1, int(round(lookahead_s * rate)))
        ahead = _sliding_min_forward(needed, size)
        # The mean of ahead[n - size + 1 .. n]: each of those minima covers frame n,
        # so the mean is never above needed[n]. Before the start, ahead[0] stands in
        # (it covers every frame up to size - 1).
        padded = numpy.concatenate([numpy.full(size - 1, ahead[0]), ahead])
        cumulative = numpy.concatenate([[0.0], numpy.cumsum(padded)])
        smoothed = (cumulative[size:] - cumulative[:-size]) / size
        smoothed = numpy.minimum(smoothed, needed)  # float rounding of the running sum
        # Release: blocks of 1 ms, a one-pole rise, never above the smoothed gain.
        block = max(1, int(round(0.001 * rate)))
        n_blocks = int(math.ceil(len(smoothed) / float(block)))
        padded = numpy.ones(n_blocks * block)
        padded[:len(smoothed)] = smoothed
        lows = padded.reshape(n_blocks, block).min(axis=1)
        coefficient = math.exp(-0.001 / max(release_s, 0.001))
        released = numpy.empty(n_blocks)
        level = 1.0
        for i, low in enumerate(lows):
            level = min(low, coefficient * level + (1.0 - coefficient) * low)
            released[i] = level
        centres = numpy.arange(n_blocks) * block + block / 2.0
        gain = numpy.minimum(smoothed, numpy.interp(numpy.arange(len(smoothed)), centres,
                                                    released))
    return gain


def limit(samples, rate, ceiling_db=-1.0, lookahead_s=0.005, release_s=0.15, oversample=4):
    """(the frames limited so the true peak stays under `ceiling_db` dBTP, the largest
    gain reduction in dB).

    A look-ahead gain computer, offline: the gain each frame needs (ceiling
    over its true peak) is taken as the minimum over the next `lookahead_s`,
    then averaged over the previous `lookahead_s`, which ramps the gain down
    before a peak and is never above what the peak needs; it recovers over
    `release_s`. The result is measured again, and any over left by the gain's
    own modulation is limited again (at most three passes), then, if any is
    left, removed by a static trim.
    """
    frames = as_frames(samples)
    if len(frames) == 0:
        return frames.copy(), 0.0
    ceiling = db_to_gain(ceiling_db)
    # Aimed 0.02 dB under the ceiling: a gain that changes from frame to frame moves
    # the peaks between frames a little. What still pokes over is limited again
    # (locally), and only as a last resort trimmed as a whole.
    aim = ceiling * db_to_gain(-0.02)
    out, total = frames, numpy.ones(len(frames))
    for _pass in range(3):
        gain = _limiter_gain(out, rate, aim, lookahead_s, release_s, oversample)
        if gain.min() >= 1.0:
            break
        out = (out * gain[:, None]).astype(numpy.float32)
        total *= gain
    reduction = -gain_to_db(float(total.min()))
    over = true_peak(out, oversample) / ceiling
    if over >= 1.0:
        trim = 1.0 / over * db_to_gain(-0.05)
        out = (out * numpy.float32(trim)).astype(numpy.float32)
        reduction -= gain_to_db(trim)
    if out is frames:
        out = frames.copy()
    return out, max(0.0, reduction)
