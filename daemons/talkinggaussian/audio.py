"""Audio in, per-frame audio features out, the way TalkingGaussian's networks read them.

Learned from upstream at commit 9bd34f7 (data_utils/hubert.py,
data_utils/deepspeech_features/, utils/audio_utils.py,
scene/dataset_readers.py); written here, not copied:

- Speech is mono float at 16 kHz. Upstream loads it with librosa (mono =
  the mean of the channels, resampled to 16 kHz); here soundfile decodes it
  and scipy's polyphase filter resamples it.
- HuBERT (facebook/hubert-large-ls960-ft) turns it into 1024-d hidden states
  at 50 Hz: its convolutional front end is one kernel of 400 samples with a
  stride of 320, so t samples give (t - 80) // 320 states. Long audio runs in
  pieces of 320 * 1000 samples (plus 80 samples of overlap), each giving
  exactly 1000 states, so memory stays bounded. Two consecutive states make
  one 25 fps video frame: the count is made even and reshaped to
  [frames, 2, 1024] (upstream's `aud_hu.npy` layout).
- DeepSpeech 0.1.0 (a frozen TensorFlow graph) gives 29 character logits at
  50 Hz; windows of 16 logits every 2 steps, with 8 zero steps of padding at
  each end, make [frames, 16, 29] (upstream's `aud_ds.npy` layout).
- The reader transposes either to [frames, channels, width] (1024 x 2 or
  29 x 16), and the motion networks read, for video frame i, the 8 frames
  i-4 .. i+3 (att_mode 2), with zeros where that window runs past either end.

Runs on Python 3.7 with numpy; soundfile and scipy are imported when used.
"""

import io
import math

import numpy as np

SAMPLE_RATE = 16000
FPS = 25

# HuBERT's convolutional feature encoder: (kernel, stride) per layer.
HUBERT_CONV_LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
HUBERT_KERNEL = 400  # the whole stack as one convolution: receptive field ...
HUBERT_STRIDE = 320  # ... and hop, in samples at 16 kHz
HUBERT_STATES_PER_PIECE = 1000  # states per forward pass over long audio
HUBERT_DIM = 1024

DEEPSPEECH_RATE = 50  # logits per second
DEEPSPEECH_WINDOW = 16
DEEPSPEECH_CLASSES = 29

# att_mode 2 of upstream's get_audio_features: frames i-4 .. i+3.
WINDOW_BEFORE = 4
WINDOW_AFTER = 4

EXTRACTORS = ("hubert", "deepspeech")
# Upstream's file name of each extractor's features in a subject's dataset.
FEATURE_FILES = {"hubert": "aud_hu.npy", "deepspeech": "aud_ds.npy"}


class AudioError(ValueError):
    """Audio a client sent that cannot be used; the message says why."""


def decode_audio(data, max_seconds=None):
    """WAV/FLAC/OGG bytes -> (float32 samples [frames, channels], sample rate)."""
    import soundfile

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AudioError("audio must be the bytes of a WAV or FLAC file, not {}".format(
            type(data).__name__))
    if len(data) == 0:
        raise AudioError("audio is empty; send the bytes of a WAV or FLAC file")
    try:
        samples, rate = soundfile.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises RuntimeError / LibsndfileError / TypeError
        raise AudioError("cannot decode the audio as WAV, FLAC or OGG ({}: {}); send the "
                         "file's bytes, not raw PCM".format(type(exc).__name__, exc))
    if samples.shape[0] == 0:
        raise AudioError("the audio holds no samples")
    seconds = samples.shape[0] / float(rate)
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError("the audio lasts {:.1f} s, more than the {:g} s allowed; split it "
                         "into several calls".format(seconds, max_seconds))
    if not np.all(np.isfinite(samples)):
        raise AudioError("the audio holds NaN or infinite samples")
    return samples, int(rate)


def to_mono(samples):
    """[frames, channels] -> [frames]: the mean of the channels (as librosa loads it)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        return samples
    return samples.mean(axis=1).astype(np.float32)


def resample(samples, rate, target=SAMPLE_RATE):
    """Mono float32 at `rate` -> at `target` (scipy's polyphase filter; linear without scipy)."""
    samples = np.asarray(samples, dtype=np.float32)
    if rate == target:
        return samples
    if rate <= 0:
        raise AudioError("the audio's sample rate is {}".format(rate))
    try:
        from scipy.signal import resample_poly
    except ImportError:
        n_out = int(round(len(samples) * float(target) / rate))
        positions = np.arange(n_out) * (float(rate) / target)
        return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)
    divisor = math.gcd(int(rate), int(target))
    return resample_poly(samples, target // divisor, int(rate) // divisor).astype(np.float32)


def speech_16k(samples, rate):
    """Decoded samples -> what the feature extractors take: mono float32 at 16 kHz."""
    return resample(to_mono(samples), rate, SAMPLE_RATE)


# --- frame counts -----------------------------------------------------------------


def hubert_states(n_samples):
    """How many 50 Hz hidden states HuBERT's encoder makes of n samples (exact, per layer)."""
    length = int(n_samples)
    for kernel, stride in HUBERT_CONV_LAYERS:
        if length < kernel:
            return 0
        length = (length - kernel) // stride + 1
    return length


def hubert_frame_count(n_samples):
    """25 fps video frames for n samples at 16 kHz with HuBERT features."""
    expected = max(0, (int(n_samples) - (HUBERT_KERNEL - HUBERT_STRIDE)) // HUBERT_STRIDE)
    return expected // 2


def deepspeech_frame_count(n_samples):
    """25 fps video frames for n samples at 16 kHz with DeepSpeech features."""
    steps = int(round(float(n_samples) / SAMPLE_RATE * DEEPSPEECH_RATE))
    return (steps + 1) // 2


def frame_count(extractor, n_samples):
    if extractor == "hubert":
        return hubert_frame_count(n_samples)
    if extractor == "deepspeech":
        return deepspeech_frame_count(n_samples)
    raise ValueError("unknown audio extractor {!r}; known: {}".format(
        extractor, ", ".join(EXTRACTORS)))


# --- windows ----------------------------------------------------------------------


def model_layout(features):
    """Upstream's .npy layout [frames, a, b] -> what the networks read: [frames, b, a], float32."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3:
        raise ValueError("audio features must be [frames, a, b], not shape {}".format(
            features.shape))
    return np.ascontiguousarray(features.transpose(0, 2, 1))


def feature_window(features, index, before=WINDOW_BEFORE, after=WINDOW_AFTER):
    """Frames index-before .. index+after-1 of `features` [frames, ...], zeros past either end."""
    count = features.shape[0]
    if not 0 <= index < count:
        raise IndexError("frame {} of {}".format(index, count))
    window = np.zeros((before + after,) + tuple(features.shape[1:]), dtype=features.dtype)
    first, last = index - before, index + after
    lo, hi = max(first, 0), min(last, count)
    window[lo - first:hi - first] = features[lo:hi]
    return window


# --- extractors -------------------------------------------------------------------


class HubertFeatures(object):
    """HuBERT hidden states per 25 fps frame: speech at 16 kHz -> [frames, 2, 1024].

    `model` is a transformers HubertModel (or anything called as
    model(input_values) with a `.last_hidden_state` [1, states, dim]);
    `processor` a Wav2Vec2FeatureExtractor (called as processor(speech,
    sampling_rate=16000, return_tensors="np").input_values), which normalizes
    the utterance to zero mean and unit variance as the model was trained.
    """

    name = "hubert"

    def __init__(self, model, processor, device="cpu"):
        self.model = model
        self.processor = processor
        self.device = device

    def to(self, device):
        self.model = self.model.to(device)
        self.device = device
        return self

    def states(self, speech):
        """50 Hz hidden states [states, dim] (a numpy array) of mono float32 speech at 16 kHz."""
        import torch

        values = np.asarray(self.processor(speech, sampling_rate=SAMPLE_RATE,
                                           return_tensors="np").input_values[0],
                            dtype=np.float32)
        expected = max(0, (len(values) - (HUBERT_KERNEL - HUBERT_STRIDE)) // HUBERT_STRIDE)
        piece = HUBERT_STRIDE * HUBERT_STATES_PER_PIECE
        overlap = HUBERT_KERNEL - HUBERT_STRIDE
        outputs = []
        start = 0
        with torch.no_grad():
            while start < len(values):
                chunk = values[start:start + piece + overlap]
                if len(chunk) >= HUBERT_KERNEL:
                    inputs = torch.from_numpy(np.ascontiguousarray(chunk))[None].to(self.device)
                    hidden = self.model(inputs).last_hidden_state[0]
                    outputs.append(hidden.float().cpu().numpy())
                start += piece
        dim = outputs[0].shape[1] if outputs else HUBERT_DIM
        states = np.concatenate(outputs, axis=0) if outputs else np.zeros((0, dim), np.float32)
        # The pieces give whole states; the last one may be one short of the formula.
        if states.shape[0] < expected:
            states = np.concatenate(
                [states, np.zeros((expected - states.shape[0], dim), np.float32)], axis=0)
        return states[:expected]

    def extract(self, speech):
        """[frames, 2, dim]: upstream's aud_hu.npy layout, two 50 Hz states per video frame."""
        states = self.states(speech)
        frames = states.shape[0] // 2
        return states[:2 * frames].reshape(frames, 2, states.shape[1])


def deepspeech_windows(logits, n_samples):
    """DeepSpeech logits [steps, 29] at 50 Hz -> [frames, 16, 29] (upstream's aud_ds.npy)."""
    logits = np.asarray(logits, dtype=np.float32)
    steps = int(round(float(n_samples) / SAMPLE_RATE * DEEPSPEECH_RATE))
    if len(logits) == 0 or steps == 0:
        return np.zeros((0, DEEPSPEECH_WINDOW, logits.shape[-1]), np.float32)
    # Resample onto `steps` instants (the same rate, so this only trims or holds the end).
    times = np.arange(steps) / float(DEEPSPEECH_RATE)
    known = np.arange(len(logits)) / float(DEEPSPEECH_RATE)
    resampled = np.stack([np.interp(times, known, logits[:, k])
                          for k in range(logits.shape[1])], axis=1).astype(np.float32)
    half = DEEPSPEECH_WINDOW // 2
    padded = np.concatenate([np.zeros((half, logits.shape[1]), np.float32), resampled,
                             np.zeros((half, logits.shape[1]), np.float32)], axis=0)
    starts = range(0, padded.shape[0] - DEEPSPEECH_WINDOW, 2)
    return np.stack([padded[s:s + DEEPSPEECH_WINDOW] for s in starts], axis=0)


class DeepSpeechFeatures(object):
    """DeepSpeech 0.1.0 logits per 25 fps frame: speech at 16 kHz -> [frames, 16, 29].

    `run_network(input_vector [steps, 494]) -> logits [steps, 1, 29]` runs the
    frozen graph (see from_frozen_graph); the graph runs on the CPU, so that
    TensorFlow never claims the GPU the renderer uses.
    """

    name = "deepspeech"
    NUM_CEPSTRUM = 26
    NUM_CONTEXT = 9

    def __init__(self, run_network, close=None):
        self.run_network = run_network
        self._close = close
        self.device = "cpu"

    def to(self, device):
        return self  # a TensorFlow session on the CPU: nothing moves

    def close(self):
        if self._close is not None:
            self._close()
            self._close = None

    @classmethod
    def from_frozen_graph(cls, path):
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        graph = tf.Graph()
        with tf.io.gfile.GFile(path, "rb") as handle:
            definition = tf.compat.v1.GraphDef()
            definition.ParseFromString(handle.read())
        with graph.as_default():
            tf.compat.v1.import_graph_def(definition, name="deepspeech")
        session = tf.compat.v1.Session(graph=graph)
        logits = graph.get_tensor_by_name("deepspeech/logits:0")
        inputs = graph.get_tensor_by_name("deepspeech/input_node:0")
        lengths = graph.get_tensor_by_name("deepspeech/input_lengths:0")

        def run(vector):
            return session.run(logits, feed_dict={inputs: vector[np.newaxis],
                                                  lengths: [vector.shape[0]]})

        return cls(run, session.close)

    @classmethod
    def input_vector(cls, speech):
        """MFCC with 9 steps of context either side, normalized: DeepSpeech 0.1.0's input."""
        from python_speech_features import mfcc

        pcm = (np.clip(speech, -1.0, 1.0) * 32767.0).astype(np.int16)
        features = mfcc(signal=pcm, samplerate=SAMPLE_RATE, numcep=cls.NUM_CEPSTRUM)[::2]
        steps = len(features)
        context = np.zeros((cls.NUM_CONTEXT, cls.NUM_CEPSTRUM), dtype=features.dtype)
        padded = np.concatenate([context, features, context])
        width = 2 * cls.NUM_CONTEXT + 1
        windows = np.stack([padded[s:s + width].reshape(-1) for s in range(steps)], axis=0)
        return (windows - windows.mean()) / windows.std()

    def extract(self, speech):
        logits = self.run_network(self.input_vector(speech))
        return deepspeech_windows(np.asarray(logits)[:, 0], len(speech))
