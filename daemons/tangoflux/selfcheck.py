"""`python -m modelhost.daemons.tangoflux.selfcheck`: the real model code on tiny random weights.

Usage: python -m modelhost.daemons.tangoflux.selfcheck [--device cuda] [--keep DIR]

Run with the daemon venv's interpreter, it checks that venv before (or
without) the 4 GB download: it writes a tiny, randomly initialized model with
the real file layout (a 2-layer T5 encoder and a fast tokenizer in place of
flan-t5-large, a TangoFlux config with one double and one single transformer
block and 32 latent frames, and diffusers' default Oobleck VAE, random), then
runs the real TangoFluxEngine on it: `_build_model` with upstream's TangoFlux
and diffusers' AutoencoderOobleck, `load_state_dict` of the safetensors,
`inference_flow` with its step callback, `decode`, seeds, cancellation and
the memory tiers. Sockets are blocked throughout: any network access fails
the check. The sound is noise (random weights); what is checked is the
plumbing. Exits 0 when every check passed.

Prints one line per check. Needs the venv of requirements.txt (torch,
diffusers, transformers, tokenizers, safetensors and upstream's package).
"""

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

from modelhost.daemons.engine import CallContext, Cancelled

from .engine import TangoFluxEngine, go_offline

TINY_TANGOFLUX = {
    "num_layers": 1,
    "num_single_layers": 1,
    "in_channels": 64,  # inference_flow draws 64-channel noise: fixed upstream
    "attention_head_dim": 128,  # FluxTransformer2DModel's rotary axes add up to 128
    "joint_attention_dim": 32,  # = the tiny T5's d_model, as 1024 = flan-t5-large's
    "num_attention_heads": 1,
    "audio_seq_len": 32,  # 32 * 2048 samples = 1.49 s
    "max_duration": 30,
    "uncondition": False,
    "text_encoder_name": "google/flan-t5-large",
}

_WORDS = ("rain", "on", "a", "tin", "roof", "dog", "barking", "in", "the", "distance",
          "wind", "thunder", "birds", "engine")


class NetworkBlocked(RuntimeError):
    pass


def _block_network():
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise NetworkBlocked("selfcheck: network access attempted: {}".format(attempts[-1]))

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    return attempts


def _tiny_text_encoder(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0) for word in _WORDS]
    vocab += [(letter, -3.0) for letter in "abcdefghijklmnopqrstuvwxyz,.\u2581"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=512)
    fast.save_pretrained(directory)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(directory, safe_serialization=True)


def write_tiny_weights(root):
    """The three directories with tiny random weights; (options, reference TangoFlux state)."""
    import torch
    from diffusers import AutoencoderOobleck
    from safetensors.torch import save_file
    from tangoflux.model import TangoFlux

    model_dir = os.path.join(root, "TangoFlux")
    text_encoder_dir = os.path.join(root, "flan-t5-large")
    os.makedirs(model_dir)
    os.makedirs(text_encoder_dir)
    _tiny_text_encoder(text_encoder_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as handle:
        json.dump(TINY_TANGOFLUX, handle)
    torch.manual_seed(1234)
    reference = TangoFlux(TINY_TANGOFLUX, text_encoder_dir=text_encoder_dir)
    # As upstream's file: without the T5 input embedding, which is tied to `shared`.
    state = {key: value.detach().clone().contiguous()
             for key, value in reference.state_dict().items()
             if key != "text_encoder.encoder.embed_tokens.weight"}
    save_file(state, os.path.join(model_dir, "tangoflux.safetensors"))
    vae = AutoencoderOobleck()
    save_file({key: value.contiguous() for key, value in vae.state_dict().items()},
              os.path.join(model_dir, "vae.safetensors"))
    # The same VAE as a diffusers directory, as stable-audio-open-1.0's vae/ is laid out.
    vae.save_pretrained(os.path.join(root, "stable-audio-open-1.0", "vae"),
                        safe_serialization=True)
    return {"model_dir": model_dir, "text_encoder_dir": text_encoder_dir}, state


class _Checks(object):
    def __init__(self):
        self.failed = 0

    def __call__(self, name, ok, detail=""):
        print("{} {}{}".format("ok  " if ok else "FAIL", name, " ({})".format(detail)
                               if detail else ""), flush=True)
        if not ok:
            self.failed += 1


def _context(events, cancel_at=None):
    holder = {}

    def send(kind, value):
        events.append((kind, value))
        fraction = value.get("fraction") if kind == "progress" else None
        if cancel_at is not None and value.get("stage") == "diffusion" and fraction is not None \
                and fraction >= cancel_at:
            holder["ctx"].cancel()

    holder["ctx"] = CallContext(request_id=1, method="generate", stream=False, send=send)
    return holder["ctx"]


def run(device, keep=None):
    go_offline()
    attempts = _block_network()
    import numpy
    import torch

    check = _Checks()
    if keep is not None:
        os.makedirs(keep)
    root = keep or tempfile.mkdtemp(prefix="tangoflux-selfcheck-")
    try:
        started = time.monotonic()
        options, reference = write_tiny_weights(root)
        print("tiny weights written to {} in {:.1f}s".format(root, time.monotonic() - started))
        check("preflight finds the layout complete", TangoFluxEngine.preflight(options) == [],
              TangoFluxEngine.preflight(options))

        engine = TangoFluxEngine(device=device, **options)
        started = time.monotonic()
        engine.load()
        print("loaded on {} in {:.1f}s".format(device, time.monotonic() - started))
        loaded = engine.model.state_dict()
        same = all(torch.equal(loaded[key].cpu(), value) for key, value in reference.items())
        check("load_state_dict put every saved weight in place", same)
        check("the modules are on {}".format(device),
              next(engine.model.transformer.parameters()).device.type == device
              and next(engine.vae.parameters()).device.type == device)

        events = []
        steps = 4
        first = engine.generate(_context(events), "rain on a tin roof", duration=1.0,
                                steps=steps, guidance_scale=4.5, seed=7)
        audio = first["audio"]
        check("audio is float32 [44100, 2], C-contiguous",
              audio.dtype == numpy.float32 and audio.shape == (44100, 2)
              and audio.flags.c_contiguous, "{} {}".format(audio.dtype, audio.shape))
        check("sample rate 44100, seed reported", first["sample_rate"] == 44100
              and first["seed"] == 7)
        check("the samples are finite", bool(numpy.isfinite(audio).all()))
        diffusion = [v["fraction"] for k, v in events
                     if k == "progress" and v["stage"] == "diffusion" and v["fraction"]]
        check("one progress event per step, rising to 1",
              diffusion == [(i + 1) / float(steps) for i in range(steps)], diffusion)
        again = engine.generate(_context([]), "rain on a tin roof", duration=1.0, steps=steps,
                                seed=7)
        check("the same seed gives the same audio", numpy.array_equal(again["audio"], audio))
        other = engine.generate(_context([]), "rain on a tin roof", duration=1.0, steps=steps,
                                seed=8)
        check("another seed gives other audio", not numpy.array_equal(other["audio"], audio))

        events = []
        try:
            engine.generate(_context(events, cancel_at=0.5), "dog barking", duration=1.0,
                            steps=steps, seed=1)
            check("a cancel between steps stops the call", False, "no Cancelled")
        except Cancelled:
            done = [v for k, v in events if v.get("stage") == "diffusion" and v["fraction"]]
            check("a cancel between steps stops the call", len(done) == steps // 2,
                  "{} of {} steps ran".format(len(done), steps))
        after = engine.generate(_context([]), "rain on a tin roof", duration=1.0, steps=steps,
                                seed=7)
        check("after a cancel, the same seed still gives the same audio",
              numpy.array_equal(after["audio"], audio))

        engine.offload()
        check("offload moves the modules to the CPU",
              next(engine.model.parameters()).device.type == "cpu"
              and next(engine.vae.parameters()).device.type == "cpu")
        engine.onload()
        check("onload brings them back to {}".format(device),
              next(engine.model.parameters()).device.type == device)
        back = engine.generate(_context([]), "rain on a tin roof", duration=1.0, steps=steps,
                               seed=7)
        close = numpy.allclose(back["audio"], audio, atol=1e-5)
        check("after offload and onload, the same audio", close)
        engine.unload()
        check("unload drops the modules", engine.model is None and engine.vae is None)
        if device.startswith("cuda"):
            check("unload gives the CUDA memory back", torch.cuda.memory_allocated() == 0,
                  "{} bytes still allocated".format(torch.cuda.memory_allocated()))
        engine.load()
        reloaded = engine.generate(_context([]), "rain on a tin roof", duration=1.0,
                                   steps=steps, seed=7)
        check("a second load works", numpy.allclose(reloaded["audio"], audio, atol=1e-5))
        engine.unload()

        vae_dir = os.path.join(root, "stable-audio-open-1.0", "vae")
        engine = TangoFluxEngine(device=device, vae_dir=vae_dir, **options)
        check("preflight accepts a diffusers VAE directory", engine.preflight(
            dict(options, vae_dir=vae_dir)) == [])
        engine.load()
        from_directory = engine.generate(_context([]), "rain on a tin roof", duration=1.0,
                                         steps=steps, seed=7)
        check("the VAE from vae_dir (from_pretrained, local files only) decodes the same",
              numpy.allclose(from_directory["audio"], audio, atol=1e-5))
        engine.unload()
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    check("no network access was attempted", not attempts, attempts)
    print("{} check(s) failed".format(check.failed) if check.failed else "all checks passed")
    return 1 if check.failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--keep", default=None,
                        help="write the tiny weights into this new directory and keep them")
    arguments = parser.parse_args(argv)
    go_offline()
    device = arguments.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return run(device, arguments.keep)


if __name__ == "__main__":
    sys.exit(main())
