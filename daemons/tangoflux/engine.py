"""TangoFlux text to audio: 44.1 kHz stereo sound effects and ambiences up to 30 s.

Upstream: github.com/declare-lab/TangoFlux at commit
164420faa2b3f8a28bb013ccde7006422a616fc7 (UPSTREAM_COMMIT), installed into
the daemon's venv by requirements.txt. Its model code
(tangoflux/model.py) last changed at 55ba477, which added the
`callback_on_step_end` hook this engine reports progress and cancels through.

How the model is built (in `_build_model`, the one place that touches
upstream's classes): upstream's convenience class TangoFluxInference
downloads from the hub by name, so we do what it does from local paths
instead: `TangoFlux(config, text_encoder_dir=...)` from model_dir/config.json
(its T5 encoder and tokenizer from the local flan-t5-large directory),
`load_state_dict` of model_dir/tangoflux.safetensors, and diffusers'
`AutoencoderOobleck` with model_dir/vae.safetensors (or a diffusers VAE
directory, `vae_dir`). The hub is switched off before any of it is imported
(HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE) and checked to be
off after; paths must be absolute local directories, so a hub name is refused
before anything is built.

A call: `model.inference_flow(...)` runs the text encoder and the flow-matching
steps (one transformer pass per step, unconditional and conditional in one
batch for classifier-free guidance) and calls `callback_on_step_end()` after
each step: there we report progress and check for cancellation, so a cancel
lands between two steps. Then `vae.decode(latents)` gives 30 s (645 latent
frames x 2048 samples) of audio, which is cut to the requested duration, as
upstream's TangoFluxInference.generate does.

Seeds: inference_flow takes a `seed` and seeds torch's global generators with
it before drawing the initial noise on the CPU. Upstream's
TangoFluxInference.generate never passes one, so its default, seed=0, made
every call with the same prompt identical. We pass the caller's seed (or a
fresh random one, reported back) on every call; because the generators are
process-global, calls are serialized by a lock.

Memory tiers: upstream's TangoFlux module owns the text encoder
(`model.text_encoder`) and the transformer (`model.transformer`) as
submodules, so the attribute `model` moves both, and `vae` the autoencoder
(TorchEngine's offload/onload/unload).

Heavy libraries (torch, diffusers, transformers, upstream) are imported in
methods only: preflight() and the import of this module need the standard
library and modelhost.
"""

import os
import random
import sys
import threading

from modelhost.daemons.engine import BadArguments, operation
from modelhost.daemons.torch_tiers import TorchEngine

from . import weights

UPSTREAM = "declare-lab/TangoFlux"
UPSTREAM_COMMIT = "164420faa2b3f8a28bb013ccde7006422a616fc7"

SAMPLE_RATE = 44100
CHANNELS = 2
DURATION_RANGE = (1.0, 30.0)  # seconds: upstream's documented range
STEPS_RANGE = (1, 200)  # upstream's Replicate demo accepts 1..200; 50 is its best, 25 close
# Exclusive at the low end: at guidance_scale <= 1 upstream's inference_flow
# takes its unguided branch, which calls encode_text with an argument that
# encode_text does not accept (a TypeError at the pinned commit).
GUIDANCE_RANGE = (1.0, 20.0)
SEED_RANGE = (0, 2**63 - 1)
RANDOM_SEEDS = 2**31  # a seed we draw is short enough to type back
MAX_PROMPT_CHARS = 2000  # the T5 tokenizer truncates at 512 tokens anyway

DEFAULT_DURATION = 10.0
DEFAULT_STEPS = 50  # upstream's inference_flow default and its README's best
DEFAULT_GUIDANCE = 4.5  # upstream's TangoFluxInference.generate default

# Set before transformers, diffusers, huggingface_hub or datasets are imported:
# each reads them once, at import.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def go_offline():
    """Switch the Hugging Face libraries' network access off for this process."""
    os.environ.update(OFFLINE_ENVIRONMENT)


def _number(name, value, low, high, low_inclusive=True, unit=""):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArguments("generate: {} must be a number, not {}".format(
            name, type(value).__name__))
    value = float(value)
    above_low = value >= low if low_inclusive else value > low
    if not (above_low and value <= high):  # also false for NaN
        if low_inclusive:
            span = "from {:g} to {:g}{}".format(low, high, unit)
        else:
            span = "more than {:g} and at most {:g}{}".format(low, high, unit)
        raise BadArguments("generate: {} must be {}, not {!r}".format(name, span, value))
    return value


def _integer(name, value, low, high, what=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadArguments("generate: {} must be an integer{}, not {}".format(
            name, what, type(value).__name__))
    if not low <= value <= high:
        raise BadArguments("generate: {} must be from {} to {}, not {}".format(
            name, low, high, value))
    return value


def check_arguments(prompt, duration, steps, guidance_scale, seed):
    """The arguments of `generate`, checked and normalized; BadArguments says what is wrong."""
    if not isinstance(prompt, str):
        raise BadArguments("generate: prompt must be a string describing the sound, not "
                           "{}".format(type(prompt).__name__))
    prompt = prompt.strip()
    if not prompt:
        raise BadArguments("generate: prompt is empty: describe the sound, e.g. 'rain on a tin "
                           "roof, distant thunder'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadArguments("generate: prompt has {} characters, at most {} are accepted".format(
            len(prompt), MAX_PROMPT_CHARS))
    duration = _number("duration", duration, *DURATION_RANGE, unit=" seconds")
    steps = _integer("steps", steps, *STEPS_RANGE)
    guidance_scale = _number("guidance_scale", guidance_scale, *GUIDANCE_RANGE,
                             low_inclusive=False)
    if seed is not None:
        seed = _integer("seed", seed, *SEED_RANGE,
                        what=" from {} to 2**63-1 or null for a random one".format(SEED_RANGE[0]))
    return prompt, duration, steps, guidance_scale, seed


def sample_count(duration, sample_rate, decoded):
    """Samples per channel for `duration` seconds, at most what the VAE decoded."""
    return min(int(round(duration * sample_rate)), decoded)


class TangoFluxEngine(TorchEngine):
    """Text to 44.1 kHz stereo float32 PCM with TangoFlux; see README.md beside this file."""

    torch_module_attributes = ("model", "vae")

    def __init__(self, model_dir=None, text_encoder_dir=None, vae_dir=None, device=None):
        super(TangoFluxEngine, self).__init__(model_dir=model_dir,
                                              text_encoder_dir=text_encoder_dir,
                                              vae_dir=vae_dir, device=device)
        # Before anything could import the Hugging Face libraries in this process.
        go_offline()
        self.model_dir = model_dir
        self.text_encoder_dir = text_encoder_dir
        self.vae_dir = vae_dir
        self.model = None  # upstream's TangoFlux: text encoder, transformer, embedders
        self.vae = None  # diffusers' AutoencoderOobleck
        self.sample_rate = None
        self.loads = 0
        # inference_flow seeds torch's process-global generators and steps a
        # scheduler that keeps state: one call at a time.
        self._lock = threading.Lock()

    @classmethod
    def preflight(cls, options):
        return weights.problems(options)

    def _weight_options(self):
        return {"model_dir": self.model_dir, "text_encoder_dir": self.text_encoder_dir,
                "vae_dir": self.vae_dir}

    # --- lifecycle ---------------------------------------------------------------------

    def load(self):
        problems = weights.problems(self._weight_options())
        if problems:
            raise RuntimeError("tangoflux: cannot load: " + "; ".join(problems))
        go_offline()
        model, vae = self._build_model()
        sample_rate = int(vae.config.sampling_rate)
        if sample_rate != SAMPLE_RATE:
            raise RuntimeError("tangoflux: the VAE decodes at {} Hz, expected {} Hz: is vae_dir "
                               "the Stable Audio Open autoencoder?".format(sample_rate,
                                                                          SAMPLE_RATE))
        self.model, self.vae = model, vae
        self.sample_rate = sample_rate
        self.loads += 1

    def unload(self):
        super(TangoFluxEngine, self).unload()
        self.sample_rate = None

    def _build_model(self):
        """Upstream's model and diffusers' VAE from the local weights: (model, vae), on
        self.device, in eval mode.

        The only method that touches upstream's classes; the rest of the engine
        uses `model.inference_flow(...)`, `vae.decode(latents).sample` and
        `vae.config.sampling_rate`.
        """
        import json

        import huggingface_hub.constants
        import transformers.utils
        from diffusers import AutoencoderOobleck
        from safetensors.torch import load_file
        from tangoflux.model import TangoFlux  # upstream, pinned in requirements.txt

        if not huggingface_hub.constants.HF_HUB_OFFLINE or not transformers.utils.is_offline_mode():
            raise RuntimeError("tangoflux: the Hugging Face hub is not off in this process "
                               "(huggingface_hub or transformers was imported before "
                               "HF_HUB_OFFLINE=1 was set); set env HF_HUB_OFFLINE=1 and "
                               "TRANSFORMERS_OFFLINE=1 for this daemon in the config")

        with open(os.path.join(self.model_dir, "config.json")) as handle:
            config = json.load(handle)
        # The text encoder and tokenizer come from the local directory, never
        # from config["text_encoder_name"] (a hub name).
        model = TangoFlux(config, text_encoder_dir=self.text_encoder_dir)
        state = load_file(os.path.join(self.model_dir, "tangoflux.safetensors"))
        outcome = model.load_state_dict(state, strict=False)
        del state
        # The file holds everything but the T5 input embedding, which T5 ties to
        # its `shared` table (upstream expects that key missing); the encoder's
        # own weights came from text_encoder_dir.
        missing = [key for key in outcome.missing_keys if not key.startswith("text_encoder.")]
        if missing or outcome.unexpected_keys:
            raise RuntimeError(
                "tangoflux: {} does not fit upstream's TangoFlux built from its config.json: "
                "{} weights missing (e.g. {}), {} unexpected (e.g. {}); is it the file from "
                "declare-lab/TangoFlux?".format(
                    os.path.join(self.model_dir, "tangoflux.safetensors"), len(missing),
                    missing[:3], len(outcome.unexpected_keys), outcome.unexpected_keys[:3]))
        model.to(self.device).eval()

        if self.vae_dir:
            vae = AutoencoderOobleck.from_pretrained(self.vae_dir, local_files_only=True)
        else:
            vae = AutoencoderOobleck()  # upstream's way: diffusers' defaults are SAO's VAE
            vae.load_state_dict(load_file(os.path.join(self.model_dir,
                                                       weights.UPSTREAM_VAE_FILE)))
        vae.to(self.device).eval()
        return model, vae

    def describe(self):
        facts = {
            "engine": "tangoflux",
            "upstream": "{}@{}".format(UPSTREAM, UPSTREAM_COMMIT[:12]),
            "device": self._device,
            "sample_rate": self.sample_rate,
            "model_dir": self.model_dir,
            "text_encoder_dir": self.text_encoder_dir,
            "vae": self.vae_dir or (os.path.join(self.model_dir, weights.UPSTREAM_VAE_FILE)
                                    if self.model_dir else None),
        }
        for library in ("torch", "diffusers", "transformers"):
            module = sys.modules.get(library)  # only what is already imported
            if module is not None:
                facts[library] = getattr(module, "__version__", None)
        return facts

    # --- operations --------------------------------------------------------------------

    @operation
    def generate(self, ctx, prompt: str, duration: float = DEFAULT_DURATION,
                 steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 seed=None):
        """Audio for a text prompt: {"audio": float32 [samples, 2], "sample_rate": 44100,
        "channels": 2, "samples", "duration", "seed", "steps", "guidance_scale"}."""
        prompt, duration, steps, guidance_scale, seed = check_arguments(
            prompt, duration, steps, guidance_scale, seed)
        if seed is None:
            seed = random.SystemRandom().randrange(RANDOM_SEEDS)
        ctx.check_cancelled()
        with self._lock:
            model, vae = self._require_loaded()
            audio = self._generate(ctx, model, vae, prompt, duration, steps, guidance_scale,
                                   seed)
        samples = int(audio.shape[0])
        return {"audio": audio, "sample_rate": self.sample_rate, "channels": CHANNELS,
                "samples": samples, "duration": samples / float(self.sample_rate),
                "seed": seed, "steps": steps, "guidance_scale": guidance_scale}

    def _generate(self, ctx, model, vae, prompt, duration, steps, guidance_scale, seed):
        import numpy
        import torch

        done = [0]

        def on_step_end():  # upstream calls it with no arguments after each step
            done[0] += 1
            ctx.progress(done[0] / float(steps), "diffusion")
            ctx.check_cancelled()  # Cancelled propagates out of inference_flow

        ctx.progress(0.0, "diffusion", "{} steps for {:g} s of audio, seed {}".format(
            steps, duration, seed))
        with torch.no_grad():
            latents = model.inference_flow(
                prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                duration=duration, seed=seed, disable_progress=True,
                num_samples_per_prompt=1, callback_on_step_end=on_step_end)
            if done[0] != steps:
                raise RuntimeError("tangoflux: inference_flow called back {} times for {} steps; "
                                   "is upstream at {}?".format(done[0], steps, UPSTREAM_COMMIT))
            ctx.check_cancelled()
            ctx.progress(None, "decode", "VAE decode")
            wave = vae.decode(latents.transpose(2, 1)).sample[0]  # [channels, 645 * 2048]
        if wave.dim() != 2 or wave.shape[0] != CHANNELS:
            raise RuntimeError("tangoflux: the VAE decoded shape {}, expected [{}, samples]".format(
                tuple(wave.shape), CHANNELS))
        keep = sample_count(duration, self.sample_rate, int(wave.shape[1]))
        frames = wave[:, :keep].to(device="cpu", dtype=torch.float32).numpy().T
        # Frames by channels, contiguous: interleaved stereo, as a WAV file holds it.
        return numpy.ascontiguousarray(frames, dtype=numpy.float32)

    def _require_loaded(self):
        if self.model is None or self.vae is None:
            raise RuntimeError("tangoflux: the engine is not loaded; call load() first")
        return self.model, self.vae

