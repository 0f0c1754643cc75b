"""CosyVoice2-0.5B text-to-speech (FunAudioLLM/CosyVoice) as a modelhost engine.

Upstream is not installed from PyPI (the `cosyvoice` package there is someone
else's): the `checkout` option names a clone of github.com/FunAudioLLM/CosyVoice
at UPSTREAM_COMMIT with its Matcha-TTS submodule, and `model_dir` the
downloaded CosyVoice2-0.5B directory. README.md says where to get both.

The boundary with upstream: `_build_model()` is the one method that imports
upstream and builds its `CosyVoice2` object; everything else talks to that
object through upstream's own interface at the pinned commit:
inference_zero_shot / inference_cross_lingual / inference_instruct2 /
inference_sft (generators of {"tts_speech": float tensor [1, N]}),
add_zero_shot_spk, list_available_spks, sample_rate, frontend (text_normalize,
spk2info, speech_tokenizer_session) and model (llm, flow, hift, device,
token_hop_len). Tests replace `_build_model()` alone with a stand-in that
follows those signatures.

What the engine adds around upstream:
- prompt audio arrives as the bytes of an audio file, is checked (rate, length,
  channels) and written to a private temporary file for upstream to read
  (audio.py says why the canonical form is mono float32 at <= 24 kHz);
- voices registered once (`register_voice`) and reused by id, kept with their
  prompt so that they are registered again after an unload (and, with
  `voices_dir`, after a restart of the process);
- the end-of-prompt marker on instruct texts; the streaming hop length reset
  per request; a warm-up at load; offload/onload/unload of the weights.

Only the standard library and modelhost are imported at module level, so that
preflight() runs without torch, numpy or upstream.

Its length (about 870 lines): one engine against one upstream interface, with its
voice registry and tier moves; the audio checks are in audio.py already.
"""

import collections
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

from modelhost.daemons.engine import BadArguments, Engine, operation

log = logging.getLogger("modelhost.daemon.cosyvoice")

# The upstream commit this engine was written and checked against (2026-03-16).
UPSTREAM_COMMIT = "ace7c47f41bbd303aa6bf1ea80e6f9fbd595cd40"
UPSTREAM_URL = "https://github.com/FunAudioLLM/CosyVoice"
README = "daemons/cosyvoice/README.md"

# CosyVoice2's instruct texts end with this special token (tokenizer.py lists it
# among CosyVoice2Tokenizer's special tokens). Upstream's frontend appended it
# itself until commit 56d9876 (2025-12-09); since then callers must.
END_OF_PROMPT = "<|endofprompt|>"

MODES = ("zero_shot", "cross_lingual", "instruct", "sft")
MAX_TEXT_CHARS = 5000
MAX_PROMPT_TEXT_CHARS = 1000
MAX_INSTRUCT_CHARS = 1000
# Upstream applies speed by stretching the mel in time (CosyVoice2Model.token2wav,
# F.interpolate); far from 1.0 it sounds broken, so the range is bounded here.
SPEED_RANGE = (0.5, 2.0)
VOICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# What CosyVoice2.__init__ reads from model_dir at the pinned commit, and why.
MODEL_FILES = (
    ("cosyvoice2.yaml", "the model's hyperpyyaml configuration"),
    ("llm.pt", "the text-speech language model's weights"),
    ("flow.pt", "the flow-matching model's weights"),
    ("hift.pt", "the HiFT vocoder's weights"),
    ("campplus.onnx", "the CAM++ speaker-embedding model"),
    ("speech_tokenizer_v2.onnx", "the speech tokenizer"),
)
# Qwen2ForCausalLM.from_pretrained and AutoTokenizer.from_pretrained read this
# directory (CosyVoice2.__init__ points qwen_pretrain_path at it).
BLANK_EN = "CosyVoice-BlankEN"

# The warm-up prompt ships with the checkout; its transcript is in upstream's example.py.
WARMUP_PROMPT = os.path.join("asset", "zero_shot_prompt.wav")
WARMUP_PROMPT_TEXT = "希望你以后能够做的比我还好呦。"
WARMUP_TEXT = "Hello, this sentence warms the model up."

_BOOLEAN_OPTIONS = ("load_jit", "load_trt", "load_vllm", "fp16", "warmup",
                    "offload_speech_tokenizer")
_CUDA_PROVIDER = "CUDAExecutionProvider"
_CPU_PROVIDER = "CPUExecutionProvider"


def _option_problems(options):
    """Lines for options of the wrong type or out of range (shared by preflight and __init__)."""
    problems = []
    accepted = set(inspect.signature(CosyVoiceEngine.__init__).parameters) - {"self"}
    for name in sorted(set(options) - accepted):
        problems.append("cosyvoice: unknown option {!r}; the options are: {}".format(
            name, ", ".join(sorted(accepted))))
    for name in ("checkout", "model_dir"):
        value = options.get(name)
        if value is None:
            problems.append("cosyvoice: option {!r} is not set: it must name {} (see {})".format(
                name, "a clone of {} at commit {}".format(UPSTREAM_URL, UPSTREAM_COMMIT)
                if name == "checkout" else "the downloaded CosyVoice2-0.5B directory", README))
        elif not isinstance(value, str) or not value:
            problems.append("cosyvoice: option {!r} must be a path, not {!r}".format(name, value))
    for name in _BOOLEAN_OPTIONS:
        if name in options and not isinstance(options[name], bool):
            problems.append("cosyvoice: option {!r} must be true or false, not {!r}".format(
                name, options[name]))
    for name, low in (("trt_concurrent", 1), ("max_voices", 0)):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            problems.append("cosyvoice: option {!r} must be an integer >= {}, not {!r}".format(
                name, low, value))
    for name in ("voices_dir", "tmp_dir"):
        value = options.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            problems.append("cosyvoice: option {!r} must be a path, not {!r}".format(name, value))
    return problems


def _lfs_pointer(path):
    """Whether a small file is a Git LFS pointer (a clone without `git lfs pull`)."""
    try:
        if os.path.getsize(path) > 1024:
            return False
        with open(path, "rb") as handle:
            return handle.read(64).startswith(b"version https://git-lfs")
    except OSError:
        return False


class _Voice(object):
    """A registered voice: what upstream needs to register it again (after a reload)."""

    __slots__ = ("voice_id", "prompt", "prompt_text")

    def __init__(self, voice_id, prompt, prompt_text):
        self.voice_id = voice_id
        self.prompt = prompt  # audio.Prompt: mono float32 at <= 24 kHz
        self.prompt_text = prompt_text

    def summary(self):
        return {"voice_id": self.voice_id, "prompt_text": self.prompt_text,
                "duration_s": round(self.prompt.duration_s, 3),
                "sample_rate": self.prompt.sample_rate}


class _Request(object):
    """One checked tts call, in the terms of upstream's inference_* methods."""

    __slots__ = ("mode", "text", "voice", "prompt", "prompt_text", "instruct_text", "speed",
                 "text_frontend")

    def __init__(self, mode, text, voice=None, prompt=None, prompt_text=None,
                 instruct_text=None, speed=1.0, text_frontend=True):
        self.mode = mode
        self.text = text
        self.voice = voice  # upstream speaker id (registered or built in), or None
        self.prompt = prompt  # audio.Prompt to hand upstream as a file, or None
        self.prompt_text = prompt_text
        self.instruct_text = instruct_text
        self.speed = speed
        self.text_frontend = text_frontend


class CosyVoiceEngine(Engine):
    """CosyVoice2-0.5B: zero-shot, cross-lingual, instruct and registered-voice speech."""

    def __init__(self, checkout=None, model_dir=None, load_jit=False, load_trt=False,
                 load_vllm=False, fp16=False, trt_concurrent=1, warmup=True, voices_dir=None,
                 max_voices=64, offload_speech_tokenizer=True, tmp_dir=None):
        options = dict(checkout=checkout, model_dir=model_dir, load_jit=load_jit,
                       load_trt=load_trt, load_vllm=load_vllm, fp16=fp16,
                       trt_concurrent=trt_concurrent, warmup=warmup, voices_dir=voices_dir,
                       max_voices=max_voices, offload_speech_tokenizer=offload_speech_tokenizer,
                       tmp_dir=tmp_dir)
        problems = _option_problems(options)
        if problems:
            raise ValueError("; ".join(problems))
        super(CosyVoiceEngine, self).__init__(**options)
        self.checkout = os.path.abspath(checkout)
        self.model_dir = os.path.abspath(model_dir)
        self.load_jit, self.load_trt, self.load_vllm = load_jit, load_trt, load_vllm
        self.fp16 = fp16
        self.trt_concurrent = trt_concurrent
        self.warmup = warmup
        # Registered voices are also written here, so they outlive the process
        # (the broker may stop an idle daemon to free memory). None: memory only.
        self.voices_dir = os.path.abspath(voices_dir) if voices_dir else None
        self.max_voices = max_voices
        # Rebuild upstream's speech-tokenizer ONNX session on the CPU at offload
        # (its CUDA arena is otherwise the one big thing left on the GPU).
        self.offload_speech_tokenizer = offload_speech_tokenizer
        self.tmp_dir = tmp_dir
        self.sample_rate = None
        self.loads = 0
        self.warmup_s = None
        self._model = None  # upstream's CosyVoice2 object, or None when unloaded
        self._tier = "unloaded"
        # token_hop_len right after the build: the value every request starts from.
        self._initial_hop_len = None
        self._builtin_speakers = ()
        self._voices = collections.OrderedDict()  # voice_id -> _Voice, kept across reloads
        self._voices_read = False  # voices_dir read once, at the first load
        self._tokenizer_moved = False  # the speech tokenizer was rebuilt on the CPU by offload()
        # Upstream's model keeps per-request state in shared attributes
        # (token_hop_len) and a registered voice lives in frontend.spk2info:
        # one request or registration at a time, and none during a tier change.
        self._lock = threading.Lock()

    # --- what keeps it from loading here ------------------------------------------

    @classmethod
    def preflight(cls, options):
        problems = _option_problems(options)
        checkout, model_dir = options.get("checkout"), options.get("model_dir")
        if isinstance(checkout, str) and checkout:
            problems += cls._checkout_problems(os.path.abspath(checkout), options)
        if isinstance(model_dir, str) and model_dir:
            problems += cls._model_dir_problems(os.path.abspath(model_dir), options)
        voices_dir = options.get("voices_dir")
        if isinstance(voices_dir, str) and voices_dir:
            voices_dir = os.path.abspath(voices_dir)
            if os.path.exists(voices_dir) and not os.path.isdir(voices_dir):
                problems.append("voices_dir {} is not a directory: expected a directory for "
                                "registered voices (it is created when missing)".format(
                                    voices_dir))
        for flag, module, what in (("load_trt", "tensorrt", "TensorRT (tensorrt-cu12)"),
                                   ("load_vllm", "vllm", "vLLM")):
            if options.get(flag) is True and importlib.util.find_spec(module) is None:
                problems.append("{} is set but {} is not installed in {} ({}); install it in "
                                "the daemon's venv or set {}: false (see {})".format(
                                    flag, what, sys.prefix, sys.executable, flag, README))
        return problems

    @staticmethod
    def _checkout_problems(checkout, options):
        expected = "a clone of {} at commit {} (`git clone --recursive`; see {})".format(
            UPSTREAM_URL, UPSTREAM_COMMIT, README)
        if not os.path.isdir(checkout):
            return ["CosyVoice checkout not found at {}: expected {}".format(checkout, expected)]
        problems = []
        entry = os.path.join(checkout, "cosyvoice", "cli", "cosyvoice.py")
        if not os.path.isfile(entry):
            problems.append("{} not found: {} is not a CosyVoice checkout; expected {}".format(
                entry, checkout, expected))
        matcha = os.path.join(checkout, "third_party", "Matcha-TTS", "matcha", "__init__.py")
        if not os.path.isfile(matcha):
            problems.append("{} not found: the Matcha-TTS submodule is not checked out; run "
                            "`git -C {} submodule update --init --recursive`".format(
                                matcha, checkout))
        if options.get("warmup", True) is True:
            prompt = os.path.join(checkout, WARMUP_PROMPT)
            if not os.path.isfile(prompt):
                problems.append("{} not found: the warm-up at load reads this prompt from the "
                                "checkout; restore it (`git -C {} checkout -- {}`) or set "
                                "warmup: false".format(prompt, checkout, WARMUP_PROMPT))
        return problems

    @staticmethod
    def _model_dir_problems(model_dir, options):
        download = ("the FunAudioLLM/CosyVoice2-0.5B model from HuggingFace or ModelScope "
                    "(see {})".format(README))
        if not os.path.isdir(model_dir):
            return ["CosyVoice2 model directory not found at {}: expected {}".format(
                model_dir, download)]
        problems = []
        wanted = list(MODEL_FILES)
        fp = "fp16" if options.get("fp16") is True else "fp32"
        if options.get("load_jit") is True:
            wanted.append(("flow.encoder.{}.zip".format(fp), "the TorchScript flow encoder that "
                           "load_jit loads"))
        if options.get("load_trt") is True:
            wanted.append(("flow.decoder.estimator.fp32.onnx", "the ONNX flow estimator that "
                           "load_trt converts to a TensorRT plan"))
        for name, what in wanted:
            path = os.path.join(model_dir, name)
            if not os.path.isfile(path):
                hint = ""
                if name == "cosyvoice2.yaml" and os.path.isfile(
                        os.path.join(model_dir, "cosyvoice.yaml")):
                    hint = ("; this directory has cosyvoice.yaml, the name in older downloads of "
                            "CosyVoice2-0.5B: download the current one")
                problems.append("{} not found: expected {} of {}{}".format(
                    path, what, download, hint))
            elif _lfs_pointer(path):
                problems.append("{} is a Git LFS pointer, not the file: run `git lfs pull` in "
                                "{} (or download with huggingface-cli / modelscope)".format(
                                    path, model_dir))
        blank = os.path.join(model_dir, BLANK_EN)
        if not os.path.isdir(blank):
            problems.append("{} not found: expected the Qwen2 configuration, tokenizer and "
                            "weights directory of {}".format(blank, download))
        else:
            for names, what in ((("config.json",), "the Qwen2 configuration"),
                                (("model.safetensors", "pytorch_model.bin"), "the Qwen2 weights"),
                                (("tokenizer.json", "vocab.json"), "the Qwen2 tokenizer")):
                if not any(os.path.isfile(os.path.join(blank, name)) for name in names):
                    problems.append("{} not found: expected {} ({}) of {}".format(
                        os.path.join(blank, names[0]), what, " or ".join(names), download))
        return problems

    # --- tiers ----------------------------------------------------------------------

    def load(self):
        with self._lock:
            if self._model is not None:
                return
            model = self._build_model()
            try:
                self._adopt(model)
                self._read_voices_dir()
                for voice in list(self._voices.values()):
                    try:
                        self._register_upstream(voice)
                    except Exception as exc:  # one bad stored voice must not fail the load
                        log.error("cosyvoice: voice %r could not be registered again, dropped: "
                                  "%s: %s", voice.voice_id, type(exc).__name__, exc)
                        del self._voices[voice.voice_id]
                if self.warmup:
                    self._warm_up()
            except BaseException:
                self._drop_model()
                raise
            self.loads += 1

    def _build_model(self):
        """Import upstream from the checkout and build its CosyVoice2 object (the one place)."""
        matcha = os.path.join(self.checkout, "third_party", "Matcha-TTS")
        for path in (matcha, self.checkout):  # the checkout ends up first
            if path not in sys.path:
                sys.path.insert(0, path)
        # Upstream wraps every inference call in tqdm; in a daemon that is a
        # progress bar per request in the log. tqdm >= 4.66 reads this.
        os.environ.setdefault("TQDM_DISABLE", "1")
        from cosyvoice.cli.cosyvoice import CosyVoice2

        accepted = inspect.signature(CosyVoice2.__init__).parameters
        if "prompt_wav" not in inspect.signature(CosyVoice2.inference_zero_shot).parameters:
            raise RuntimeError(
                "the CosyVoice checkout at {} has the older API (prompt audio as a 16 kHz "
                "tensor); this engine needs upstream at commit {} or later: `git -C {} fetch && "
                "git -C {} checkout {} && git -C {} submodule update --init --recursive`".format(
                    self.checkout, UPSTREAM_COMMIT, self.checkout, self.checkout,
                    UPSTREAM_COMMIT, self.checkout))
        arguments = {"load_jit": self.load_jit, "load_trt": self.load_trt, "fp16": self.fp16}
        # Newer arguments, passed only where this checkout has them.
        for name, value, default in (("load_vllm", self.load_vllm, False),
                                     ("trt_concurrent", self.trt_concurrent, 1)):
            if name in accepted:
                arguments[name] = value
            elif value != default:
                raise RuntimeError("{}={!r} is set, but CosyVoice2 at {} has no {} argument; "
                                   "use upstream commit {}".format(
                                       name, value, self.checkout, name, UPSTREAM_COMMIT))
        # model_dir exists (preflight): upstream would otherwise download it from ModelScope.
        return CosyVoice2(self.model_dir, **arguments)

    def _adopt(self, model):
        self._model = model
        self.sample_rate = int(model.sample_rate)
        self._initial_hop_len = model.model.token_hop_len
        self._builtin_speakers = tuple(
            spk for spk in model.list_available_spks() if spk not in self._voices)
        self._tier = "resident"

    def offload(self):
        """Weights to host RAM: llm, flow and hift (torch modules), speaker tensors, tokenizer.

        What stays on the GPU: the CUDA context and torch's side stream
        (upstream's llm_context), and with load_trt / load_vllm the TensorRT
        engine and the vLLM engine, which cannot be moved (a warning says so).
        """
        with self._lock:
            model = self._require_model()
            for name in ("llm", "flow", "hift"):
                module = getattr(model.model, name, None)
                if module is not None:
                    module.to("cpu")  # torch.nn.Module.to moves in place
            self._move_speakers("cpu")
            if self.offload_speech_tokenizer:
                self._tokenizer_moved = self._rebuild_speech_tokenizer(on_cuda=False)
            if self.load_trt or self.load_vllm:
                log.warning("cosyvoice: offloaded llm, flow and hift; the %s stays on the GPU",
                            " and the ".join(name for name, on in (
                                ("TensorRT flow estimator", self.load_trt),
                                ("vLLM engine", self.load_vllm)) if on))
            self._tier = "offloaded"

    def onload(self):
        with self._lock:
            model = self._require_model()
            device = model.model.device  # upstream's own choice: cuda when available
            for name in ("llm", "flow", "hift"):
                module = getattr(model.model, name, None)
                if module is not None:
                    module.to(device)
            self._move_speakers(model.frontend.device)
            if self._tokenizer_moved:
                self._rebuild_speech_tokenizer(on_cuda=True)
                self._tokenizer_moved = False
            self._tier = "resident"

    def unload(self):
        with self._lock:
            self._drop_model()

    def _drop_model(self):
        # Registered voices stay in self._voices: load() registers them again.
        self._model = None
        self._initial_hop_len = None
        self._tokenizer_moved = False
        self._tier = "unloaded"
        # The runtime collects garbage and empties torch's CUDA cache after unload().

    def _move_speakers(self, device):
        """frontend.spk2info's tensors (registered voices, built-in speakers) to `device`."""
        for spk, entry in self._model.frontend.spk2info.items():
            for key, value in list(entry.items()):
                if hasattr(value, "to") and hasattr(value, "device"):
                    entry[key] = value.to(device)

    def _rebuild_speech_tokenizer(self, on_cuda):
        """Rebuild frontend.speech_tokenizer_session on the CPU or on CUDA; whether it did.

        An ONNX Runtime session cannot move between providers: upstream builds
        this one on CUDA when torch sees a GPU, so offload() replaces it with a
        CPU session of the same file and options (its CUDA arena goes with the
        old session) and onload() builds the CUDA one again. Untouched when it
        is on the CPU already (no GPU, or tests).
        """
        frontend = self._model.frontend
        session = getattr(frontend, "speech_tokenizer_session", None)
        if session is None:
            return False
        on_cuda_now = _CUDA_PROVIDER in session.get_providers()
        if on_cuda_now == on_cuda:
            return False
        import onnxruntime

        providers = [_CUDA_PROVIDER, _CPU_PROVIDER] if on_cuda else [_CPU_PROVIDER]
        path = os.path.join(self.model_dir, "speech_tokenizer_v2.onnx")
        frontend.speech_tokenizer_session = onnxruntime.InferenceSession(
            path, sess_options=session.get_session_options(), providers=providers)
        del session
        return True

    def describe(self):
        return {
            "engine": "cosyvoice2",
            "upstream_commit": UPSTREAM_COMMIT,
            "checkout": self.checkout,
            "model_dir": self.model_dir,
            "tier": self._tier,
            "sample_rate": self.sample_rate,
            "fp16": self.fp16, "load_jit": self.load_jit, "load_trt": self.load_trt,
            "load_vllm": self.load_vllm,
            "voices": len(self._voices),
            "builtin_speakers": len(self._builtin_speakers),
            "token_hop_len": self._initial_hop_len,
            "warmup_s": self.warmup_s,
            "loads": self.loads,
        }

    # --- operations -------------------------------------------------------------------

    @operation
    def tts(self, ctx, text: str, mode="zero_shot", voice=None, prompt_audio=None,
            prompt_text=None, instruct_text=None, speed=1.0, stream=None, text_frontend=True):
        """Speech for `text`; see README.md for the modes and what each needs.

        Without streaming: {"audio": float32 array (N,), "sample_rate": 24000,
        "format": "float32", "channels": 1, "samples": N, "duration_s"}.
        Streaming (stream=True, or the client iterates and stream is left
        unset): each chunk {"audio": float32 array (n,), "sample_rate": 24000}
        as upstream produces it; the result {"sample_rate", "format",
        "channels", "samples", "duration_s", "chunks"}.
        """
        if stream is not None and not isinstance(stream, bool):
            raise BadArguments("tts: stream must be true, false or left out, not {!r}".format(
                stream))
        streaming = ctx.stream if stream is None else stream
        request = self._check_tts(text, mode, voice, prompt_audio, prompt_text, instruct_text,
                                  speed, streaming, text_frontend)
        if streaming:
            return self._streamed(ctx, request)
        return self._whole(ctx, request)

    @operation
    def register_voice(self, ctx, voice_id: str, prompt_audio, prompt_text: str):
        """Register a voice once (upstream's add_zero_shot_spk); `tts(voice=voice_id)` reuses it.

        Returns {"voice_id", "prompt_text", "duration_s", "sample_rate" (as
        stored: at most 24000), "replaced": whether the id was registered before}.
        """
        where = "register_voice"
        if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id):
            raise BadArguments(
                "{}: voice_id must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit, not {!r}".format(where, voice_id))
        prompt_text = self._check_text(where, "prompt_text", prompt_text, MAX_PROMPT_TEXT_CHARS)
        prompt = self._decode(where, prompt_audio)
        with self._lock:
            model = self._require_model()
            if voice_id in self._builtin_speakers:
                raise BadArguments("{}: {!r} is a built-in speaker of this model; choose another "
                                   "voice_id".format(where, voice_id))
            replaced = voice_id in self._voices
            if not replaced and len(self._voices) >= self.max_voices:
                raise BadArguments("{}: {} voices are registered, the limit (max_voices); "
                                   "unregister_voice one first".format(where, len(self._voices)))
            voice = _Voice(voice_id, prompt, prompt_text)
            self._register_upstream(voice, model)
            self._voices[voice_id] = voice
            self._save_voice(voice)
        result = voice.summary()
        result["replaced"] = replaced
        return result

    @operation
    def unregister_voice(self, ctx, voice_id: str):
        """Forget a registered voice: {"voice_id", "removed": whether it was registered}."""
        with self._lock:
            model = self._require_model()
            removed = self._voices.pop(voice_id, None) is not None
            if removed:
                model.frontend.spk2info.pop(voice_id, None)
                self._delete_saved_voice(voice_id)
        return {"voice_id": voice_id, "removed": removed}

    @operation
    def voices(self, ctx):
        """{"registered": [{"voice_id", "prompt_text", "duration_s", "sample_rate"}...],
        "builtin": [speaker ids of the model's spk2info.pt, for mode "sft"]}."""
        with self._lock:
            self._require_model()
            return {"registered": [voice.summary() for voice in self._voices.values()],
                    "builtin": list(self._builtin_speakers)}

    # --- checking a call ----------------------------------------------------------------

    def _check_tts(self, text, mode, voice, prompt_audio, prompt_text, instruct_text, speed,
                   streaming, text_frontend):
        where = "tts"
        # None stands for "the default", so that a client helper may pass every keyword.
        mode = "zero_shot" if mode is None else mode
        speed = 1.0 if speed is None else speed
        text_frontend = True if text_frontend is None else text_frontend
        text = self._check_text(where, "text", text, MAX_TEXT_CHARS)
        if mode not in MODES:
            raise BadArguments("tts: mode must be one of {}, not {!r}".format(
                ", ".join(MODES), mode))
        if not isinstance(text_frontend, bool):
            raise BadArguments("tts: text_frontend must be true or false, not {!r}".format(
                text_frontend))
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(
                speed) or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise BadArguments("tts: speed must be a number from {} to {}, not {!r}".format(
                SPEED_RANGE[0], SPEED_RANGE[1], speed))
        speed = float(speed)
        if streaming and speed != 1.0:
            raise BadArguments("tts: speed works only without streaming (upstream stretches the "
                               "whole utterance at once); leave speed at 1.0 or do not stream")
        if voice is not None and not isinstance(voice, str):
            raise BadArguments("tts: voice must be a string, not {}".format(type(voice).__name__))
        request = _Request(mode, text, speed=speed, text_frontend=text_frontend)

        if mode == "sft":
            for name, value in (("prompt_audio", prompt_audio), ("prompt_text", prompt_text),
                                ("instruct_text", instruct_text)):
                if value is not None:
                    raise BadArguments("tts: mode 'sft' speaks with a built-in speaker and takes "
                                       "no {}".format(name))
            if voice is None:
                raise BadArguments("tts: mode 'sft' needs voice=, one of the built-in speakers "
                                   "({})".format(self._builtin_list()))
            if voice not in self._builtin_speakers:
                raise BadArguments("tts: {!r} is not a built-in speaker; built-in: {}{}".format(
                    voice, self._builtin_list(),
                    " ({!r} is a registered voice: use mode 'zero_shot')".format(voice)
                    if voice in self._voices else ""))
            request.voice = voice
            return request

        if instruct_text is not None and mode != "instruct":
            raise BadArguments("tts: instruct_text is for mode 'instruct', not {!r}".format(mode))
        if voice is not None and prompt_audio is not None:
            raise BadArguments("tts: give either voice= (a registered voice) or prompt_audio=, "
                               "not both")
        if voice is None and prompt_audio is None:
            raise BadArguments(
                "tts: mode {!r} needs a voice: prompt_audio= (the bytes of a WAV or FLAC file{}) "
                "or voice= (an id from register_voice)".format(
                    mode, " with prompt_text=, its transcript" if mode == "zero_shot" else ""))
        registered = None
        if voice is not None:
            registered = self._voices.get(voice)
            if registered is None:
                raise BadArguments("tts: unknown voice {!r}; registered voices: {} (register one "
                                   "with register_voice; voices are kept across unloads{})".format(
                                       voice, ", ".join(self._voices) or "none",
                                       "" if self.voices_dir else
                                       ", not across restarts unless voices_dir is set"))
            if prompt_text is not None:
                raise BadArguments("tts: voice {!r} was registered with its prompt_text; give "
                                   "either voice= or prompt_audio= with prompt_text=".format(voice))

        if mode == "zero_shot":
            if registered is not None:
                request.voice = voice
            else:
                if prompt_text is None:
                    raise BadArguments("tts: mode 'zero_shot' with prompt_audio needs "
                                       "prompt_text=, the transcript of the prompt (or use mode "
                                       "'cross_lingual', which needs none)")
                request.prompt_text = self._check_text(where, "prompt_text", prompt_text,
                                                       MAX_PROMPT_TEXT_CHARS)
                request.prompt = self._decode(where, prompt_audio)
        elif mode == "cross_lingual":
            if prompt_text is not None:
                raise BadArguments("tts: mode 'cross_lingual' takes no prompt_text (the prompt's "
                                   "words are not used); use mode 'zero_shot' to give one")
            if registered is not None:
                request.voice = voice
            else:
                request.prompt = self._decode(where, prompt_audio)
        else:  # instruct
            if prompt_text is not None:
                raise BadArguments("tts: mode 'instruct' takes instruct_text=, not prompt_text=")
            if instruct_text is None:
                raise BadArguments("tts: mode 'instruct' needs instruct_text=, e.g. "
                                   "'Speak slowly and softly.'")
            request.instruct_text = self._with_end_of_prompt(
                self._check_text(where, "instruct_text", instruct_text, MAX_INSTRUCT_CHARS))
            # Upstream's frontend_instruct2 given a speaker id takes the prompt
            # text stored at registration and drops the instruct text, so a
            # registered voice is handed over as its prompt audio instead.
            request.prompt = registered.prompt if registered is not None else self._decode(
                where, prompt_audio)
        return request

    @staticmethod
    def _with_end_of_prompt(instruct_text):
        """The instruct text ending with END_OF_PROMPT (added when the caller left it out)."""
        if instruct_text.rstrip().endswith(END_OF_PROMPT):
            return instruct_text
        if END_OF_PROMPT in instruct_text:
            raise BadArguments("tts: instruct_text has {} in the middle; it may only end the "
                               "instruction".format(END_OF_PROMPT))
        return instruct_text + END_OF_PROMPT

    @staticmethod
    def _check_text(where, name, value, limit):
        if not isinstance(value, str):
            raise BadArguments("{}: {} must be a string, not {}".format(
                where, name, type(value).__name__))
        if not value.strip():
            raise BadArguments("{}: {} is empty".format(where, name))
        if len(value) > limit:
            raise BadArguments("{}: {} is {} characters; the limit is {}".format(
                where, name, len(value), limit))
        if "\x00" in value:
            raise BadArguments("{}: {} contains a NUL character".format(where, name))
        return value

    @staticmethod
    def _decode(where, prompt_audio):
        from . import audio

        try:
            return audio.decode_prompt(prompt_audio)
        except audio.AudioError as exc:
            raise BadArguments("{}: prompt_audio {}".format(where, exc))

    def _builtin_list(self):
        return ", ".join(self._builtin_speakers) or "none in this model directory"

    # --- running a call -------------------------------------------------------------------

    def _whole(self, ctx, request):
        import numpy

        ctx.progress(0.0, "synthesize", "{} characters".format(len(request.text)))
        with self._lock:
            pieces = list(self._synthesize(ctx, request, stream=False))
        audio = numpy.concatenate(pieces) if pieces else numpy.zeros(0, dtype=numpy.float32)
        ctx.progress(1.0, "synthesize", "{:.2f} s of audio".format(len(audio) / self.sample_rate))
        return {"audio": audio, "sample_rate": self.sample_rate, "format": "float32",
                "channels": 1, "samples": int(len(audio)),
                "duration_s": len(audio) / float(self.sample_rate)}

    def _streamed(self, ctx, request):
        ctx.progress(0.0, "synthesize", "{} characters, streaming".format(len(request.text)))
        chunks = samples = 0
        # A generator holding the lock: the runtime drains it on one thread and
        # closes it when the client goes away, which releases the lock.
        with self._lock:
            for pcm in self._synthesize(ctx, request, stream=True):
                chunks += 1
                samples += len(pcm)
                yield {"audio": pcm, "sample_rate": self.sample_rate}
                ctx.progress(None, "synthesize", "{} chunks, {:.2f} s of audio".format(
                    chunks, samples / float(self.sample_rate)))
        ctx.progress(1.0, "synthesize", "{:.2f} s of audio".format(
            samples / float(self.sample_rate)))
        return {"sample_rate": self.sample_rate, "format": "float32", "channels": 1,
                "samples": samples, "duration_s": samples / float(self.sample_rate),
                "chunks": chunks}

    def _synthesize(self, ctx, request, stream):
        """Upstream's generator for the request, as float32 arrays; the caller holds the lock."""
        model = self._require_model()
        if request.mode != "sft" and request.voice is not None and (
                request.voice not in self._voices):
            raise BadArguments("tts: voice {!r} was unregistered while this call waited".format(
                request.voice))
        # CosyVoice2Model.tts multiplies self.token_hop_len by stream_scale_factor
        # after every streamed chunk (up to token_max_hop_len) and never sets it
        # back, so each streaming request would start where the previous one
        # ended (25 -> 100 tokens: a first chunk about 3 s later). Reset it
        # to its value at build time before every request; the lock keeps two
        # requests from sharing it.
        model.model.token_hop_len = self._initial_hop_len
        with self._prompt_file(request.prompt) as prompt_path:
            outputs = self._inference(model, request, prompt_path, stream)
            try:
                for output in outputs:
                    if ctx is not None:
                        ctx.check_cancelled()
                    pcm = self._pcm_of(output)
                    if len(pcm):
                        yield pcm
            finally:
                # Upstream's LLM thread for this request still runs to its end.
                outputs.close()

    @staticmethod
    def _inference(model, request, prompt_path, stream):
        common = {"stream": stream, "speed": request.speed,
                  "text_frontend": request.text_frontend}
        if request.mode == "sft":
            return model.inference_sft(request.text, request.voice, **common)
        wav = prompt_path or ""
        speaker = request.voice or ""
        if request.mode == "zero_shot":
            return model.inference_zero_shot(request.text, request.prompt_text or "", wav,
                                             zero_shot_spk_id=speaker, **common)
        if request.mode == "cross_lingual":
            return model.inference_cross_lingual(request.text, wav, zero_shot_spk_id=speaker,
                                                 **common)
        return model.inference_instruct2(request.text, request.instruct_text, wav,
                                         zero_shot_spk_id="", **common)

    @staticmethod
    def _pcm_of(output):
        """Upstream's {"tts_speech": tensor [1, N]} -> a float32 numpy array (N,) of our own."""
        import numpy

        speech = output["tts_speech"]
        if speech.dim() != 2 or speech.shape[0] != 1:
            raise RuntimeError("cosyvoice: upstream yielded tts_speech of shape {}, expected "
                               "[1, N]".format(tuple(speech.shape)))
        # A copy: on the CPU the tensor may share storage with upstream's caches.
        return numpy.array(speech.detach().cpu().float().numpy().reshape(-1),
                           dtype=numpy.float32, copy=True)

    @contextmanager
    def _prompt_file(self, prompt):
        """A private temporary WAV of the prompt for upstream's load_wav (None: no file)."""
        if prompt is None:
            yield None
            return
        from . import audio

        handle, path = tempfile.mkstemp(prefix="cosyvoice-prompt-", suffix=".wav",
                                        dir=self.tmp_dir)
        os.close(handle)
        try:
            audio.write_wav(path, prompt.samples, prompt.sample_rate)
            yield path
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _register_upstream(self, voice, model=None):
        model = model or self._model
        # inference_zero_shot normalizes its prompt_text, add_zero_shot_spk does
        # not: normalize here so a registered voice speaks as a direct prompt would.
        prompt_text = model.frontend.text_normalize(voice.prompt_text, split=False,
                                                    text_frontend=True)
        with self._prompt_file(voice.prompt) as path:
            if model.add_zero_shot_spk(prompt_text, path, voice.voice_id) is not True:
                raise RuntimeError("cosyvoice: add_zero_shot_spk({!r}) did not succeed".format(
                    voice.voice_id))

    def _warm_up(self):
        """One whole and one streamed zero-shot call, so the first user call is not the slow one."""
        from . import audio

        started = time.monotonic()
        prompt = audio.read_prompt_file(os.path.join(self.checkout, WARMUP_PROMPT))
        request = _Request("zero_shot", WARMUP_TEXT, prompt=prompt,
                           prompt_text=WARMUP_PROMPT_TEXT)
        for stream in (False, True):
            for _ in self._synthesize(None, request, stream=stream):
                pass
        self.warmup_s = time.monotonic() - started
        log.info("cosyvoice: warm-up took %.2f s", self.warmup_s)

    def _require_model(self):
        if self._model is None:
            raise RuntimeError("cosyvoice: the engine is not loaded; call load() first")
        return self._model

    # --- voices on disk -------------------------------------------------------------------

    def _read_voices_dir(self):
        """Voices saved by an earlier process, read once (at the first load)."""
        if self._voices_read or not self.voices_dir:
            return
        self._voices_read = True
        if not os.path.isdir(self.voices_dir):
            return
        from . import audio

        for name in sorted(os.listdir(self.voices_dir)):
            voice_id, ext = os.path.splitext(name)
            if ext != ".json" or voice_id in self._voices or not VOICE_ID.match(voice_id):
                continue
            try:
                with open(os.path.join(self.voices_dir, name)) as handle:
                    prompt_text = json.load(handle)["prompt_text"]
                prompt = audio.read_prompt_file(os.path.join(self.voices_dir, voice_id + ".wav"))
            except Exception as exc:
                log.error("cosyvoice: skipped saved voice %s in %s: %s: %s", voice_id,
                          self.voices_dir, type(exc).__name__, exc)
                continue
            self._voices[voice_id] = _Voice(voice_id, prompt, prompt_text)

    def _save_voice(self, voice):
        if not self.voices_dir:
            return
        from . import audio

        os.makedirs(self.voices_dir, exist_ok=True)
        base = os.path.join(self.voices_dir, voice.voice_id)
        # The .json is written last: a voice without one is never read back.
        audio.write_wav(base + ".wav.tmp", voice.prompt.samples, voice.prompt.sample_rate)
        os.replace(base + ".wav.tmp", base + ".wav")
        with open(base + ".json.tmp", "w") as handle:
            json.dump({"voice_id": voice.voice_id, "prompt_text": voice.prompt_text}, handle,
                      ensure_ascii=False)
        os.replace(base + ".json.tmp", base + ".json")

    def _delete_saved_voice(self, voice_id):
        if not self.voices_dir:
            return
        for ext in (".json", ".wav"):
            try:
                os.unlink(os.path.join(self.voices_dir, voice_id + ext))
            except OSError:
                pass
