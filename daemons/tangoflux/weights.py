"""Where TangoFlux's weights live on disk, and what is checked there before a load.

Three local directories, named by the daemon's options, each an absolute path
(the daemon never downloads: a hub name is refused, not resolved):

- model_dir: a copy of huggingface.co/declare-lab/TangoFlux. Upstream
  (declare-lab/TangoFlux@164420f, tangoflux/__init__.py, TangoFluxInference)
  reads exactly three files from it: config.json (the TangoFlux model's
  hyperparameters), tangoflux.safetensors (transformer, text projection,
  duration embedder, and a copy of the T5 encoder's weights) and
  vae.safetensors (the Stable Audio Open autoencoder's weights, loaded into
  diffusers' AutoencoderOobleck in its default configuration).
- text_encoder_dir: a copy of google/flan-t5-large. Upstream's TangoFlux
  builds its T5EncoderModel and T5TokenizerFast from it (it names the hub
  repository in config.json's text_encoder_name; we pass the directory
  instead). transformers reads config.json, the weights (model.safetensors,
  pytorch_model.bin, or their sharded index), and the fast tokenizer from
  tokenizer.json with tokenizer_config.json (which sets model_max_length).
  spiece.model alone is not enough: converting it needs sentencepiece and
  protobuf, which the venv does not have.
- vae_dir (optional): a diffusers AutoencoderOobleck directory such as the
  vae/ folder of stabilityai/stable-audio-open-1.0 (gated): config.json and
  diffusion_pytorch_model.safetensors. Unset: model_dir/vae.safetensors, as
  upstream loads it.

Cheap: only os.path, so that preflight() imports nothing heavy.
"""

import os
import re

# Files below this size are taken for Git LFS pointers (about 130 bytes) or
# interrupted downloads, not weights.
MIN_WEIGHT_BYTES = 1024

TANGOFLUX_FILES = ("config.json", "tangoflux.safetensors")
UPSTREAM_VAE_FILE = "vae.safetensors"
TEXT_ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin",
                        "model.safetensors.index.json", "pytorch_model.bin.index.json")
VAE_CONFIG = "config.json"
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_README = "see daemons/tangoflux/README.md"


def _download_tangoflux(where):
    return ("huggingface-cli download declare-lab/TangoFlux --include '*.json' "
            "'*.safetensors' --local-dir {}".format(where))


def _download_text_encoder(where):
    return ("huggingface-cli download google/flan-t5-large --include '*.json' '*.model' "
            "model.safetensors --local-dir {}".format(where))


def _download_vae(where):
    parent = os.path.dirname(where.rstrip("/")) or where
    return ("gated: accept the license at huggingface.co/stabilityai/stable-audio-open-1.0, "
            "`huggingface-cli login`, then huggingface-cli download "
            "stabilityai/stable-audio-open-1.0 --include 'vae/*' --local-dir {}; or leave "
            "vae_dir unset to use model_dir/vae.safetensors".format(parent))


def _listing(names):
    names = list(names)
    if len(names) == 1:
        return names[0]
    return "{} and {}".format(", ".join(names[:-1]), names[-1])


def _path_problem(option, value, placeholder, download):
    """A line when `value` is not an absolute path, else None (the directory is checked next)."""
    if value is None or value == "":
        return "{} is not set: the absolute path of a local directory ({})".format(
            option, download(placeholder))
    if not isinstance(value, str):
        return "{} must be a path (a string), not {}".format(option, type(value).__name__)
    if not os.path.isabs(value):
        hub = " (a Hugging Face hub name?)" if _HUB_NAME.match(value) else ""
        return ("{} must be an absolute local path, not {!r}{}: this daemon runs with the hub "
                "off and never downloads; download it first ({})".format(
                    option, value, hub, download(placeholder)))
    return None


def _small(path):
    try:
        return os.path.getsize(path) < MIN_WEIGHT_BYTES
    except OSError:
        return False


def _check_directory(option, path, what, required, weights, download):
    """Lines about one directory: `required` files, and one of `weights` (alternatives)."""
    expected = list(required) + ([" or ".join(weights)] if weights else [])
    if not os.path.isdir(path):
        return ["{}: {} not found at {}: expected a directory holding {} ({}; {})".format(
            option, what, path, _listing(expected), download(path), _README)]
    missing = [name for name in required if not os.path.isfile(os.path.join(path, name))]
    present_weights = [name for name in weights if os.path.isfile(os.path.join(path, name))]
    if weights and not present_weights:
        missing.append(" or ".join(weights))
    problems = []
    if missing:
        problems.append("{}: {} at {} lacks {} (it should hold {}; {})".format(
            option, what, path, _listing(missing), _listing(expected), download(path)))
    for name in [n for n in required if n.endswith((".safetensors", ".bin"))] + present_weights:
        full = os.path.join(path, name)
        if name.endswith((".safetensors", ".bin")) and _small(full):
            problems.append("{}: {} is only {} bytes: a Git LFS pointer or an interrupted "
                            "download, not the weights ({})".format(
                                option, full, os.path.getsize(full), download(path)))
    return problems


def problems(options):
    """What keeps the weights named by `options` from loading: lines for people."""
    found = []
    model_dir = options.get("model_dir")
    text_encoder_dir = options.get("text_encoder_dir")
    vae_dir = options.get("vae_dir")

    line = _path_problem("model_dir", model_dir, "/srv/models/TangoFlux", _download_tangoflux)
    if line:
        found.append(line)
    else:
        required = TANGOFLUX_FILES + (() if vae_dir else (UPSTREAM_VAE_FILE,))
        found += _check_directory("model_dir", model_dir, "TangoFlux weights", required, (),
                                  _download_tangoflux)

    line = _path_problem("text_encoder_dir", text_encoder_dir, "/srv/models/flan-t5-large",
                         _download_text_encoder)
    if line:
        found.append(line)
    else:
        found += _check_directory("text_encoder_dir", text_encoder_dir,
                                  "flan-t5-large text encoder", TEXT_ENCODER_FILES,
                                  TEXT_ENCODER_WEIGHTS, _download_text_encoder)

    if vae_dir is not None:
        line = _path_problem("vae_dir", vae_dir, "/srv/models/stable-audio-open-1.0/vae",
                             _download_vae)
        if line:
            found.append(line)
        else:
            found += _check_directory("vae_dir", vae_dir, "Oobleck VAE", (VAE_CONFIG,),
                                      VAE_WEIGHTS, _download_vae)
    return found
