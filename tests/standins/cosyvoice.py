"""A stand-in for upstream CosyVoice2 (FunAudioLLM/CosyVoice@ace7c47): no weights, no speech.

CosyVoice2StandIn is a test stand-in, not the model. A test subclass of
CosyVoiceEngine replaces only `_build_model()` with it, so that everything
else (argument checks, prompt decoding, temporary prompt files, voices,
streaming, the hop-length reset, warm-up, tiers) runs the engine's own code on
a CPU, against an object with upstream's interface at the pinned commit
(cosyvoice/cli/cosyvoice.py, frontend.py, model.py):

- `CosyVoice2StandIn(model_dir, load_jit=False, load_trt=False, load_vllm=False,
  fp16=False, trt_concurrent=1)`, `sample_rate` 24000, `list_available_spks()`,
  `add_zero_shot_spk(prompt_text, prompt_wav, zero_shot_spk_id)` -> True;
- generators `inference_sft(tts_text, spk_id, ...)`,
  `inference_zero_shot(tts_text, prompt_text, prompt_wav, zero_shot_spk_id='', ...)`,
  `inference_cross_lingual(tts_text, prompt_wav, zero_shot_spk_id='', ...)`,
  `inference_instruct2(tts_text, instruct_text, prompt_wav, zero_shot_spk_id='', ...)`,
  each with `stream=False, speed=1.0, text_frontend=True`, yielding
  {"tts_speech": float32 tensor [1, N]} per text segment (non-streamed) or per
  chunk (streamed);
- `frontend`: `text_normalize`, `spk2info`, `device`, and ONNX-session
  stand-ins (`speech_tokenizer_session`, `campplus_session`) on the CPU provider;
  a prompt is read from its path with soundfile, channels averaged, refused
  under 16 kHz or over 30 s, as upstream's `load_wav` and tokenizer do;
- `model`: `llm`, `flow`, `hift` (small torch modules that record `.to()`),
  `device`, and upstream's streaming state: `token_hop_len` 25 that grows by
  `stream_scale_factor` 2 after every streamed chunk up to `token_max_hop_len`
  100 and is never set back (CosyVoice2Model.tts), and `pre_lookahead_len` 3.
  As upstream, a speed other than 1.0 fails an assertion once a streamed
  chunk has gone out. As upstream's frontend_instruct2, given a speaker id,
  instruct2 keeps the registered prompt text and drops the instruct text.

The audio: per text segment of L characters, 4 * L speech "tokens" of 960
samples (24 kHz / 25 Hz), a sine at 200 + 10 * L Hz whose phase runs on over
the whole segment, so streamed chunks concatenate to the non-streamed audio.
Its amplitude is the voice: derived from the prompt's length (or the
built-in speaker's embedding), so a registered voice sounds as its prompt did.
`speed` shortens the segment to int(N / speed) samples at the same pitch.

Every inference call, registration and prompt read is recorded (`calls`,
`frontend.prompt_reads`, `model.stream_hops`, `.moves` on each module).
"""

import math
import os
import re

import numpy
import soundfile
import torch

SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 24 kHz audio, 25 Hz speech tokens
TOKENS_PER_CHAR = 4
BUILTIN_SPEAKER = "standin_speaker"  # as if the model directory had a spk2info.pt
BUILTIN_AMPLITUDE = 0.5


def segment_audio(text, amplitude, speed=1.0):
    """What the stand-in says for one text segment: the expected samples, for tests."""
    amplitude = float(numpy.float32(amplitude))  # as it comes out of a float32 embedding
    count = len(text) * TOKENS_PER_CHAR * SAMPLES_PER_TOKEN
    if speed != 1.0:
        count = int(count / speed)
    frequency = 200.0 + 10.0 * len(text)
    phase = 2.0 * math.pi * frequency * numpy.arange(count) / SAMPLE_RATE
    return (amplitude * numpy.sin(phase)).astype(numpy.float32)


def prompt_amplitude(frames, sample_rate):
    """The stand-in's "speaker embedding": a loudness from the prompt's duration."""
    return round(0.1 + min(0.8, frames / float(sample_rate) / 40.0), 6)


class _RecordingModule(torch.nn.Module):
    """A small module with weights that notes every `.to()` call (where tiers moved it)."""

    def __init__(self, name):
        super(_RecordingModule, self).__init__()
        self.name = name
        self.layer = torch.nn.Linear(8, 8)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return super(_RecordingModule, self).to(*args, **kwargs)


class _OnnxSessionStandIn(object):
    """An onnxruntime.InferenceSession as far as the engine looks at one: its providers."""

    def __init__(self, path, providers):
        self.path = path
        self._providers = list(providers)

    def get_providers(self):
        return list(self._providers)


class _FrontEndStandIn(object):
    def __init__(self, model_dir):
        self.device = torch.device("cpu")
        self.campplus_session = _OnnxSessionStandIn(
            os.path.join(model_dir, "campplus.onnx"), ["CPUExecutionProvider"])
        self.speech_tokenizer_session = _OnnxSessionStandIn(
            os.path.join(model_dir, "speech_tokenizer_v2.onnx"), ["CPUExecutionProvider"])
        embedding = torch.full((1, 192), BUILTIN_AMPLITUDE)
        self.spk2info = {BUILTIN_SPEAKER: {"embedding": embedding}}
        self.prompt_reads = []  # {"path", "sample_rate", "frames", "channels", "subtype"}

    def text_normalize(self, text, split=True, text_frontend=True):
        # Upstream skips its text frontend for texts with <|...|> markers.
        if "<|" in text and "|>" in text:
            text_frontend = False
        if text_frontend is False or text == "":
            return [text] if split is True else text
        text = text.strip()
        if split is not True:
            return text
        return [part.strip() for part in re.split(r"(?<=[.!?。！？])\s*", text) if part.strip()]

    def load_prompt(self, prompt_wav):
        """Upstream's load_wav: a path (or file object) read with soundfile, channels averaged."""
        samples, rate = soundfile.read(prompt_wav, dtype="float32", always_2d=True)
        info = soundfile.info(prompt_wav)
        self.prompt_reads.append({"path": prompt_wav, "sample_rate": rate, "frames": len(samples),
                                  "channels": samples.shape[1], "subtype": info.subtype})
        assert rate >= 16000, "wav sample rate {} must be greater than 16000".format(rate)
        assert len(samples) / rate <= 30, \
            "do not support extract speech token for audio longer than 30s"
        return samples.mean(axis=1), rate

    def frontend_zero_shot(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id):
        if zero_shot_spk_id == "":
            samples, rate = self.load_prompt(prompt_wav)
            amplitude = prompt_amplitude(len(samples), rate)
            model_input = {"prompt_text": _tokens(prompt_text),
                           "llm_embedding": torch.full((1, 192), amplitude),
                           "flow_embedding": torch.full((1, 192), amplitude),
                           "prompt_speech_feat": torch.zeros(1, 2 * int(len(samples) / rate * 25),
                                                             80)}
        else:
            model_input = dict(self.spk2info[zero_shot_spk_id])
        model_input["text"] = _tokens(tts_text)
        return model_input


def _tokens(text):
    return torch.tensor([[ord(c) for c in text]], dtype=torch.int32).reshape(1, -1)


class _ModelStandIn(object):
    def __init__(self):
        self.device = torch.device("cpu")
        self.llm = _RecordingModule("llm")
        self.flow = _RecordingModule("flow")
        self.hift = _RecordingModule("hift")
        self.token_hop_len = 25
        self.token_max_hop_len = 4 * self.token_hop_len
        self.stream_scale_factor = 2
        self.pre_lookahead_len = 3
        self.stream_hops = []  # token_hop_len when each streamed request started

    def tts(self, text, flow_embedding=None, stream=False, speed=1.0, **model_input):
        tokens = text.shape[1] * TOKENS_PER_CHAR
        amplitude = float(flow_embedding.reshape(-1)[0])
        whole = segment_audio("x" * text.shape[1], amplitude, speed=1.0 if stream else speed)
        if not stream:
            yield {"tts_speech": torch.from_numpy(whole).reshape(1, -1)}
            return
        self.stream_hops.append(self.token_hop_len)
        offset = 0
        sent = False
        while tokens - offset >= self.token_hop_len + self.pre_lookahead_len:
            hop = self.token_hop_len
            piece = whole[offset * SAMPLES_PER_TOKEN:(offset + hop) * SAMPLES_PER_TOKEN]
            offset += hop
            # Mutated in place and never set back, as upstream does.
            self.token_hop_len = min(self.token_max_hop_len,
                                     self.token_hop_len * self.stream_scale_factor)
            sent = True
            yield {"tts_speech": torch.from_numpy(piece.copy()).reshape(1, -1)}
        if speed != 1.0:
            assert not sent, "speed change only support non-stream inference mode"
        yield {"tts_speech": torch.from_numpy(
            whole[offset * SAMPLES_PER_TOKEN:].copy()).reshape(1, -1)}


class CosyVoice2StandIn(object):
    """Stand-in for cosyvoice.cli.cosyvoice.CosyVoice2 at ace7c47 (see the module docstring)."""

    def __init__(self, model_dir, load_jit=False, load_trt=False, load_vllm=False, fp16=False,
                 trt_concurrent=1):
        if not os.path.exists(model_dir):
            raise ValueError("{} not found!".format(model_dir))
        self.model_dir = model_dir
        self.fp16 = fp16
        self.arguments = {"load_jit": load_jit, "load_trt": load_trt, "load_vllm": load_vllm,
                          "fp16": fp16, "trt_concurrent": trt_concurrent}
        self.frontend = _FrontEndStandIn(model_dir)
        self.sample_rate = SAMPLE_RATE
        self.model = _ModelStandIn()
        self.calls = []  # (method, {argument: value})

    def list_available_spks(self):
        return list(self.frontend.spk2info.keys())

    def add_zero_shot_spk(self, prompt_text, prompt_wav, zero_shot_spk_id):
        assert zero_shot_spk_id != "", "do not use empty zero_shot_spk_id"
        self.calls.append(("add_zero_shot_spk", {"prompt_text": prompt_text,
                                                 "prompt_wav": prompt_wav,
                                                 "zero_shot_spk_id": zero_shot_spk_id}))
        model_input = self.frontend.frontend_zero_shot("", prompt_text, prompt_wav, "")
        del model_input["text"]
        self.frontend.spk2info[zero_shot_spk_id] = model_input
        return True

    def _run(self, tts_text, make_input, stream, speed, text_frontend):
        for segment in self.frontend.text_normalize(tts_text, split=True,
                                                    text_frontend=text_frontend):
            model_input = make_input(segment)
            for output in self.model.tts(**model_input, stream=stream, speed=speed):
                yield output

    def inference_sft(self, tts_text, spk_id, stream=False, speed=1.0, text_frontend=True):
        self.calls.append(("inference_sft", {"tts_text": tts_text, "spk_id": spk_id,
                                             "stream": stream, "speed": speed}))

        def make_input(segment):
            embedding = self.frontend.spk2info[spk_id]["embedding"]
            return {"text": _tokens(segment), "llm_embedding": embedding,
                    "flow_embedding": embedding}
        return self._run(tts_text, make_input, stream, speed, text_frontend)

    def inference_zero_shot(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id="",
                            stream=False, speed=1.0, text_frontend=True):
        self.calls.append(("inference_zero_shot", {
            "tts_text": tts_text, "prompt_text": prompt_text, "prompt_wav": prompt_wav,
            "zero_shot_spk_id": zero_shot_spk_id, "stream": stream, "speed": speed,
            "text_frontend": text_frontend}))
        prompt_text = self.frontend.text_normalize(prompt_text, split=False,
                                                   text_frontend=text_frontend)
        return self._run(tts_text, lambda segment: self.frontend.frontend_zero_shot(
            segment, prompt_text, prompt_wav, zero_shot_spk_id), stream, speed, text_frontend)

    def inference_cross_lingual(self, tts_text, prompt_wav, zero_shot_spk_id="", stream=False,
                                speed=1.0, text_frontend=True):
        self.calls.append(("inference_cross_lingual", {
            "tts_text": tts_text, "prompt_wav": prompt_wav, "zero_shot_spk_id": zero_shot_spk_id,
            "stream": stream, "speed": speed}))

        def make_input(segment):
            model_input = self.frontend.frontend_zero_shot(segment, "", prompt_wav,
                                                           zero_shot_spk_id)
            model_input.pop("prompt_text", None)
            return model_input
        return self._run(tts_text, make_input, stream, speed, text_frontend)

    def inference_instruct2(self, tts_text, instruct_text, prompt_wav, zero_shot_spk_id="",
                            stream=False, speed=1.0, text_frontend=True):
        self.calls.append(("inference_instruct2", {
            "tts_text": tts_text, "instruct_text": instruct_text, "prompt_wav": prompt_wav,
            "zero_shot_spk_id": zero_shot_spk_id, "stream": stream, "speed": speed}))
        # As upstream: with a speaker id, the prompt text stored at registration wins.
        return self._run(tts_text, lambda segment: self.frontend.frontend_zero_shot(
            segment, instruct_text, prompt_wav, zero_shot_spk_id), stream, speed, text_frontend)


# --- a checkout and a model directory that pass the engine's preflight ---------------------

CHECKOUT_FILES = ("cosyvoice/cli/cosyvoice.py", "third_party/Matcha-TTS/matcha/__init__.py")
MODEL_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx",
               "speech_tokenizer_v2.onnx", "CosyVoice-BlankEN/config.json",
               "CosyVoice-BlankEN/model.safetensors", "CosyVoice-BlankEN/vocab.json",
               "CosyVoice-BlankEN/merges.txt")
WARMUP_PROMPT_SECONDS = 3.48  # as upstream's asset/zero_shot_prompt.wav (24 kHz, float)


def make_layout(root):
    """(checkout, model_dir) under `root` with the files preflight looks for: placeholders.

    The warm-up prompt is a real 24 kHz float WAV (a tone), since the engine
    decodes it; every other file only says that it is a stand-in.
    """
    checkout = os.path.join(str(root), "CosyVoice")
    model_dir = os.path.join(str(root), "CosyVoice2-0.5B")
    for base, names in ((checkout, CHECKOUT_FILES), (model_dir, MODEL_FILES)):
        for name in names:
            path = os.path.join(base, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write("placeholder written by tests/standins/cosyvoice.py\n")
    prompt = os.path.join(checkout, "asset", "zero_shot_prompt.wav")
    os.makedirs(os.path.dirname(prompt), exist_ok=True)
    count = int(WARMUP_PROMPT_SECONDS * SAMPLE_RATE)
    tone = 0.3 * numpy.sin(2 * math.pi * 220.0 * numpy.arange(count) / SAMPLE_RATE)
    soundfile.write(prompt, tone.astype(numpy.float32), SAMPLE_RATE, subtype="FLOAT")
    return checkout, model_dir
