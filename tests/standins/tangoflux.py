"""Stand-ins for upstream TangoFlux's model and diffusers' Oobleck VAE: no weights, no sound.

These are test stand-ins, not the models. They let TangoFluxEngine run on a
CPU without the 4 GB of weights: a test subclass replaces only the engine's
`_build_model()` with `build_standins(...)`, and everything else (argument
checks, seeds, progress, cancellation, cutting to the duration, tiers) runs
the engine's own code against objects with upstream's interface:

- TangoFluxStandIn(config, text_encoder_dir) follows upstream's
  `TangoFlux` (declare-lab/TangoFlux@164420f, tangoflux/model.py): built from
  the model's config.json, with `text_encoder` and `transformer` submodules
  (one small layer each, so that tier moves have weights to move), and
  `inference_flow(prompt, num_inference_steps, timesteps, guidance_scale,
  duration, seed, disable_progress, num_samples_per_prompt,
  callback_on_step_end)` with upstream's defaults: it seeds torch's global
  generators with `seed`, draws the initial noise [n, audio_seq_len, 64] on
  the CPU as upstream does, runs `num_inference_steps` steps, calls
  `callback_on_step_end()` after each, and returns the latents. At
  guidance_scale <= 1 it raises the TypeError upstream's unguided branch
  raises. The latents depend on the prompt, the duration and the seed,
  deterministically.
- OobleckVAEStandIn follows diffusers' `AutoencoderOobleck` (0.30.0):
  `config.sampling_rate` 44100, `hop_length` 2048, and
  `decode(z, return_dict=True, generator=None)` from [batch, 64, frames] to
  `.sample` [batch, 2, frames * 2048]: a 440 Hz tone whose loudness per
  channel follows the latents, so that different latents give different audio.

Each records its calls (`calls`, `steps_run`, `decodes`) for the tests.
"""

import hashlib
import json
import math
import os

import torch

HOP_LENGTH = 2048  # prod([2, 4, 4, 8, 8]): AutoencoderOobleck's default downsampling_ratios
SAMPLE_RATE = 44100
LATENT_CHANNELS = 64

# What upstream's config.json holds (the keys TangoFlux.__init__ reads).
TANGOFLUX_CONFIG = {
    "num_layers": 6,
    "num_single_layers": 18,
    "in_channels": 64,
    "attention_head_dim": 128,
    "joint_attention_dim": 1024,
    "num_attention_heads": 8,
    "audio_seq_len": 645,
    "max_duration": 30,
    "uncondition": False,
    "text_encoder_name": "google/flan-t5-large",
}


def _fixed_init(module, seed):
    """Deterministic weights, independent of torch's global generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.2 - 0.1)
    return module


def _prompt_code(prompt, channels):
    """A vector in [-1, 1] that depends only on the prompt's text."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    values = [(digest[i % len(digest)] / 127.5) - 1.0 for i in range(channels)]
    return torch.tensor(values, dtype=torch.float32)


class TangoFluxStandIn(torch.nn.Module):
    """A stand-in for upstream's TangoFlux: its inference interface, none of its model."""

    def __init__(self, config, text_encoder_dir=None, initialize_reference_model=False):
        super(TangoFluxStandIn, self).__init__()
        self.audio_seq_len = config.get("audio_seq_len", 645)
        self.max_duration = config.get("max_duration", 30)
        self.in_channels = config.get("in_channels", 64)
        self.text_encoder_dir = text_encoder_dir
        self.text_encoder = _fixed_init(torch.nn.Linear(8, 8), 1)
        self.transformer = _fixed_init(torch.nn.Linear(self.in_channels, self.in_channels), 2)
        self.calls = []  # keyword arguments of each inference_flow call
        self.steps_run = 0  # steps taken over all calls

    @torch.no_grad()
    def inference_flow(self, prompt, num_inference_steps=50, timesteps=None, guidance_scale=3,
                       duration=10, seed=0, disable_progress=False, num_samples_per_prompt=1,
                       callback_on_step_end=None):
        self.calls.append(dict(prompt=prompt, num_inference_steps=num_inference_steps,
                               timesteps=timesteps, guidance_scale=guidance_scale,
                               duration=duration, seed=seed, disable_progress=disable_progress,
                               num_samples_per_prompt=num_samples_per_prompt))
        if guidance_scale <= 1.0:
            # What upstream's unguided branch does at the pinned commit.
            raise TypeError("encode_text() got an unexpected keyword argument "
                            "'num_samples_per_prompt'")
        torch.manual_seed(seed)  # upstream seeds the global generators, as here
        prompts = prompt if isinstance(prompt, list) else [prompt]
        device = self.transformer.weight.device
        latents = torch.randn(num_samples_per_prompt, self.audio_seq_len, self.in_channels)
        latents = latents.to(device)
        target = torch.stack([_prompt_code(p, self.in_channels) for p in prompts]).to(device)
        target = target.repeat_interleave(num_samples_per_prompt, 0)[:, None, :]
        # Frames past the duration fade toward silence, as the real model's do.
        seconds_per_frame = float(self.max_duration) / self.audio_seq_len
        times = torch.arange(self.audio_seq_len, device=device) * seconds_per_frame
        loudness = torch.where(times < float(duration), torch.ones_like(times),
                               torch.full_like(times, 0.05))[None, :, None]
        for _ in range(num_inference_steps):
            # Each step pulls the noise part way toward the prompt's target; the
            # seed's noise never vanishes entirely, so seeds give different audio.
            latents = latents + (target * loudness - latents) * (0.5 / num_inference_steps)
            latents = latents + 0.01 * torch.tanh(self.transformer(latents))
            self.steps_run += 1
            if callback_on_step_end is not None:
                callback_on_step_end()
        return latents


class _DecoderOutput(object):
    def __init__(self, sample):
        self.sample = sample


class _VAEConfig(object):
    """The fields of AutoencoderOobleck's config that callers read."""

    def __init__(self):
        self.sampling_rate = SAMPLE_RATE
        self.audio_channels = 2
        self.decoder_input_channels = LATENT_CHANNELS
        self.downsampling_ratios = [2, 4, 4, 8, 8]


class OobleckVAEStandIn(torch.nn.Module):
    """A stand-in for diffusers' AutoencoderOobleck: decode() shapes, none of its model."""

    def __init__(self):
        super(OobleckVAEStandIn, self).__init__()
        self.config = _VAEConfig()
        self.hop_length = HOP_LENGTH
        self.sampling_rate = SAMPLE_RATE
        self.out = _fixed_init(torch.nn.Linear(LATENT_CHANNELS, 2), 3)
        self.decodes = 0

    @property
    def device(self):
        return self.out.weight.device

    def decode(self, z, return_dict=True, generator=None):
        self.decodes += 1
        if z.dim() != 3 or z.shape[1] != LATENT_CHANNELS:
            raise ValueError("decode expects [batch, {}, frames], got {}".format(
                LATENT_CHANNELS, tuple(z.shape)))
        level = 0.5 * torch.tanh(self.out(z.transpose(1, 2)))  # [batch, frames, 2]
        level = level.transpose(1, 2).repeat_interleave(self.hop_length, dim=-1)
        samples = level.shape[-1]
        t = torch.arange(samples, device=z.device, dtype=torch.float32) / self.sampling_rate
        sample = level * torch.sin(2 * math.pi * 440.0 * t)
        if not return_dict:
            return (sample,)
        return _DecoderOutput(sample)


def build_standins(model_dir, text_encoder_dir, device):
    """(model, vae) as TangoFluxEngine._build_model returns them, from stand-ins.

    Reads model_dir/config.json as upstream's loader does; the weight files
    are not read (they are placeholders in tests).
    """
    with open(os.path.join(model_dir, "config.json")) as handle:
        config = json.load(handle)
    model = TangoFluxStandIn(config, text_encoder_dir=text_encoder_dir).to(device).eval()
    vae = OobleckVAEStandIn().to(device).eval()
    return model, vae


def write_placeholder_weights(root, vae_dir=False):
    """Directories laid out as the engine's preflight expects, with placeholder files.

    Returns the engine options {model_dir, text_encoder_dir[, vae_dir]}. The
    .safetensors files are 4 KiB of zeros, not weights: only stand-ins load
    from them.
    """
    root = os.path.abspath(str(root))
    model_dir = os.path.join(root, "TangoFlux")
    text_encoder_dir = os.path.join(root, "flan-t5-large")
    placeholder = b"\0" * 4096
    files = {
        model_dir: {"config.json": json.dumps(TANGOFLUX_CONFIG).encode(),
                    "tangoflux.safetensors": placeholder, "vae.safetensors": placeholder},
        text_encoder_dir: {"config.json": b"{}", "tokenizer.json": b"{}",
                           "tokenizer_config.json": b"{}", "spiece.model": placeholder,
                           "model.safetensors": placeholder},
    }
    options = {"model_dir": model_dir, "text_encoder_dir": text_encoder_dir}
    if vae_dir:
        options["vae_dir"] = os.path.join(root, "stable-audio-open-1.0", "vae")
        files[options["vae_dir"]] = {"config.json": b"{}",
                                     "diffusion_pytorch_model.safetensors": placeholder}
    for directory, contents in files.items():
        os.makedirs(directory, exist_ok=True)
        for name, data in contents.items():
            with open(os.path.join(directory, name), "wb") as handle:
                handle.write(data)
    return options
