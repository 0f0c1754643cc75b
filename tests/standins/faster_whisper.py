"""A stand-in for the `faster_whisper` package (faster-whisper 1.2.1): no weights, no speech.

Tests put this module in sys.modules as `faster_whisper`, so that the real
FasterWhisperEngine (its `_build_model` included) runs against an object with
upstream's interface (faster_whisper/transcribe.py at 1.2.1):

- `WhisperModel(model_size_or_path, device="auto", device_index=0,
  compute_type="default", cpu_threads=0, num_workers=1, download_root=None,
  local_files_only=False, files=None, revision=None, use_auth_token=None)`:
  upstream downloads from the Hugging Face Hub whenever `model_size_or_path`
  is not a directory; here that raises AssertionError (the engine must never
  get there), as does a directory without tokenizer.json (upstream would
  fetch a tokenizer from the Hub). `supported_languages`: Whisper's codes,
  or ["en"] when the directory's config.json says {"multilingual": false}
  (a stand-in key: upstream asks CTranslate2's model.is_multilingual).
- `transcribe(audio, language=None, task="transcribe", beam_size=5,
  word_timestamps=False, vad_filter=False, ...)` -> (a lazy generator of
  Segment, TranscriptionInfo). Only numpy float32 audio at 16 kHz is
  accepted here (upstream also reads files); a language it does not know is
  a ValueError, as upstream's tokenizer raises.

What it "hears": tone bursts. Each burst (RMS over 0.02 in 20 ms frames,
gaps under 60 ms bridged) is a word named by its pitch, 100 Hz steps:
100 Hz "one", 200 Hz "two", ... 900 Hz "nine" (anything else: "tone").
Bursts less than 1 s apart form one segment; a segment's text is its words
with a leading space each, as Whisper's. Word.start/end are the burst's
edges. So a test can check that the engine resampled the audio right (the
pitches survive) and placed the times right. Every constructor and
transcribe call is recorded in `calls`; `segments_yielded` counts segments
taken from the generators (laziness: progress comes per segment).
"""

import collections
import json
import os

import numpy

LANGUAGES = ("en", "de", "fr", "es", "it", "ja", "zh", "nl", "pt", "ru")
NAMES = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
         8: "eight", 9: "nine"}
FRAME = 320  # 20 ms at 16 kHz
SAMPLE_RATE = 16000

Word = collections.namedtuple("Word", "start end word probability")
Segment = collections.namedtuple(
    "Segment", "id seek start end text tokens avg_logprob compression_ratio no_speech_prob "
               "words temperature")
TranscriptionInfo = collections.namedtuple(
    "TranscriptionInfo", "language language_probability duration duration_after_vad "
                         "all_language_probs transcription_options vad_options")

calls = []
segments_yielded = [0]


def reset():
    del calls[:]
    segments_yielded[0] = 0


class WhisperModel(object):
    def __init__(self, model_size_or_path, device="auto", device_index=0, compute_type="default",
                 cpu_threads=0, num_workers=1, download_root=None, local_files_only=False,
                 files=None, revision=None, use_auth_token=None, **model_kwargs):
        calls.append(("init", model_size_or_path, dict(
            device=device, device_index=device_index, compute_type=compute_type,
            cpu_threads=cpu_threads, num_workers=num_workers, download_root=download_root,
            local_files_only=local_files_only, files=files, revision=revision,
            use_auth_token=use_auth_token, **model_kwargs)))
        if not os.path.isdir(model_size_or_path):
            raise AssertionError("faster-whisper would download {!r} from the Hub".format(
                model_size_or_path))
        if not os.path.isfile(os.path.join(model_size_or_path, "tokenizer.json")):
            raise AssertionError("faster-whisper would fetch a tokenizer from the Hub")
        multilingual = True
        config = os.path.join(model_size_or_path, "config.json")
        if os.path.isfile(config):
            with open(config) as handle:
                multilingual = json.load(handle).get("multilingual", True)
        self.supported_languages = list(LANGUAGES) if multilingual else ["en"]
        self.device = device

    def transcribe(self, audio, language=None, task="transcribe", beam_size=5,
                   word_timestamps=False, vad_filter=False, **options):
        calls.append(("transcribe", len(audio), dict(
            language=language, task=task, beam_size=beam_size,
            word_timestamps=word_timestamps, vad_filter=vad_filter, **options)))
        if not isinstance(audio, numpy.ndarray) or audio.dtype != numpy.float32 \
                or audio.ndim != 1:
            raise TypeError("the stand-in takes 1-D float32 arrays at 16 kHz")
        if language is not None and language not in self.supported_languages:
            raise ValueError("'{}' is not a valid language code".format(language))
        duration = len(audio) / float(SAMPLE_RATE)
        info = TranscriptionInfo(language or "en", 1.0 if language else 0.9, duration, duration,
                                 None, None, None)
        return self._segments(audio, word_timestamps), info

    def _segments(self, audio, word_timestamps):
        groups = []
        for word in _bursts(audio):
            if groups and word.start - groups[-1][-1].end < 1.0:
                groups[-1].append(word)
            else:
                groups.append([word])
        for index, words in enumerate(groups):
            segments_yielded[0] += 1
            yield Segment(index, 0, words[0].start, words[-1].end,
                          "".join(w.word for w in words), [], -0.1, 1.0, 0.01,
                          words if word_timestamps else None, 0.0)


def _bursts(audio):
    frames = len(audio) // FRAME
    if not frames:
        return []
    rms = numpy.sqrt((audio[:frames * FRAME].reshape(frames, FRAME) ** 2).mean(axis=1))
    loud = rms > 0.02
    runs, start, quiet = [], None, 0
    for index, on in enumerate(loud):
        if on:
            if start is None:
                start = index
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet > 3:
                runs.append((start, index - quiet + 1))
                start, quiet = None, 0
    if start is not None:
        runs.append((start, frames - quiet))
    words = []
    for first, stop in runs:
        piece = audio[first * FRAME:stop * FRAME]
        crossings = numpy.count_nonzero(numpy.diff(numpy.signbit(piece)))
        pitch = crossings / 2.0 / (len(piece) / float(SAMPLE_RATE))
        step = int(round(pitch / 100.0))
        name = NAMES.get(step, "tone") if abs(pitch - 100.0 * step) < 25 else "tone"
        words.append(Word(round(first * FRAME / float(SAMPLE_RATE), 3),
                          round(stop * FRAME / float(SAMPLE_RATE), 3), " " + name, 0.99))
    return words
