"""The TangoFlux engine with stand-ins for upstream's model and VAE (tests/standins/tangoflux.py).

Only `_build_model()` is replaced, by a subclass; the engine's own argument
checks, seeds, progress, cancellation, cutting to the duration, preflight and
tiers run as in the daemon. The real model code path (upstream's TangoFlux
and diffusers' AutoencoderOobleck at the pinned versions, on tiny random
weights) is `python -m modelhost.daemons.tangoflux.selfcheck` in the daemon's
venv; test_selfcheck_in_the_daemon_venv runs it when $TANGOFLUX_PYTHON names
that venv's interpreter.
"""

import os
import subprocess
import sys

import pytest

numpy = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

from modelhost.daemons.engine import CallContext, operations_of  # noqa: E402
from modelhost.daemons.runtime import check_arguments, tiers_of  # noqa: E402
from modelhost.daemons.tangoflux import engine as tangoflux  # noqa: E402
from modelhost.daemons.tangoflux.engine import TangoFluxEngine  # noqa: E402
from modelhost.errors import BadArguments, Cancelled  # noqa: E402

from conftest import ROOT, daemon_yaml  # noqa: E402
from standins.tangoflux import (TANGOFLUX_CONFIG, OobleckVAEStandIn,  # noqa: E402
                                TangoFluxStandIn, build_standins, write_placeholder_weights)

DECODED = TANGOFLUX_CONFIG["audio_seq_len"] * 2048  # what the VAE gives: 1,320,960 samples


class StandInEngine(TangoFluxEngine):
    """The engine with stand-ins for upstream's objects; counts its builds."""

    builds = 0

    def _build_model(self):
        StandInEngine.builds += 1
        return build_standins(self.model_dir, self.text_encoder_dir, self.device)


def make_ctx(send=None):
    return CallContext(request_id=1, method="generate", stream=False,
                       send=send or (lambda kind, value: None))


class Recorder(object):
    """A send() that records what the engine reports; optionally cancels at a fraction."""

    def __init__(self, cancel_at=None):
        self.events = []
        self.cancel_at = cancel_at
        self.ctx = make_ctx(self.send)

    def send(self, kind, value):
        self.events.append((kind, value))
        fraction = value.get("fraction")
        if self.cancel_at is not None and value.get("stage") == "diffusion" \
                and fraction is not None and fraction >= self.cancel_at:
            self.ctx.cancel()

    def stage(self, name):
        return [value for kind, value in self.events
                if kind == "progress" and value["stage"] == name]


@pytest.fixture
def offline_env(monkeypatch):
    """The Hugging Face variables as the test found them, restored afterwards."""
    for name in tangoflux.OFFLINE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_placeholder_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def engine(weights, offline_env):
    engine = StandInEngine(device="cpu", **weights)
    engine.load()
    yield engine
    engine.unload()


def generate(engine, ctx=None, **arguments):
    arguments.setdefault("prompt", "rain on a tin roof")
    arguments.setdefault("duration", 2)
    arguments.setdefault("steps", 4)
    return engine.generate(ctx or make_ctx(), **arguments)


# --- the operation --------------------------------------------------------------------


def test_operations_and_describe(engine, weights):
    assert set(operations_of(engine)) == {"generate"}
    facts = engine.describe()
    assert facts["engine"] == "tangoflux"
    assert facts["upstream"] == "declare-lab/TangoFlux@164420faa2b3"
    assert facts["sample_rate"] == 44100 and facts["device"] == "cpu"
    assert facts["vae"] == os.path.join(weights["model_dir"], "vae.safetensors")


def test_output_is_stereo_float32_at_44100(engine):
    result = generate(engine, duration=2.5, seed=1)
    audio = result["audio"]
    assert isinstance(audio, numpy.ndarray)
    assert audio.dtype == numpy.float32 and audio.ndim == 2 and audio.shape[1] == 2
    assert audio.flags.c_contiguous  # frames x channels: interleaved, as a WAV holds it
    assert result["sample_rate"] == 44100 and result["channels"] == 2
    assert result["samples"] == audio.shape[0] == 110250
    assert result["duration"] == pytest.approx(2.5)
    assert {"seed", "steps", "guidance_scale"} <= set(result)
    assert float(numpy.abs(audio).max()) > 0.01  # not silence
    assert not numpy.array_equal(audio[:, 0], audio[:, 1])  # two channels, not one twice


@pytest.mark.parametrize("duration, samples", [
    (1, 44100), (1.5, 66150), (2.3, 101430), (10, 441000), (29.9, 1318590),
    (30, DECODED),  # the VAE decodes 645 x 2048 samples (29.95 s): 30 s is cut there
])
def test_duration_sets_the_sample_count(engine, duration, samples):
    result = generate(engine, duration=duration, steps=1, seed=0)
    assert result["samples"] == result["audio"].shape[0] == samples


def test_arguments_reach_inference_flow_by_upstreams_names(engine):
    generate(engine, prompt="  dog barking  ", duration=3, steps=5, guidance_scale=3.5, seed=11)
    assert engine.model.calls[-1] == dict(
        prompt="dog barking", num_inference_steps=5, timesteps=None, guidance_scale=3.5,
        duration=3.0, seed=11, disable_progress=True, num_samples_per_prompt=1)
    assert engine.vae.decodes == 1


def test_defaults_are_upstreams(engine):
    result = engine.generate(make_ctx(), "wind")
    call = engine.model.calls[-1]
    assert (call["num_inference_steps"], call["guidance_scale"], call["duration"]) == (
        50, 4.5, 10.0)
    assert result["samples"] == 441000


# --- seeds ---------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_audio(engine):
    first = generate(engine, seed=1234)
    generate(engine, seed=99)  # a call in between must not matter
    second = generate(engine, seed=1234)
    assert first["seed"] == second["seed"] == 1234
    assert numpy.array_equal(first["audio"], second["audio"])


def test_different_seeds_give_different_audio(engine):
    one = generate(engine, seed=1)
    two = generate(engine, seed=2)
    assert not numpy.array_equal(one["audio"], two["audio"])
    assert not numpy.allclose(one["audio"], two["audio"], atol=1e-3)


def test_no_seed_draws_one_and_reports_it(engine):
    first = generate(engine)
    second = generate(engine, seed=None)
    assert isinstance(first["seed"], int) and 0 <= first["seed"] < 2**31
    assert first["seed"] != second["seed"]  # 1 in 2**31 to collide
    assert not numpy.array_equal(first["audio"], second["audio"])
    again = generate(engine, seed=first["seed"])
    assert numpy.array_equal(again["audio"], first["audio"])


def test_the_prompt_changes_the_audio(engine):
    rain = generate(engine, prompt="rain", seed=5)
    dog = generate(engine, prompt="dog barking", seed=5)
    assert not numpy.array_equal(rain["audio"], dog["audio"])


def test_large_seeds_are_accepted(engine):
    assert generate(engine, seed=2**63 - 1)["seed"] == 2**63 - 1


# --- progress and cancellation -----------------------------------------------------------


def test_progress_once_per_step_then_decode(engine):
    recorder = Recorder()
    generate(engine, recorder.ctx, steps=8, seed=3)
    diffusion = [value["fraction"] for value in recorder.stage("diffusion")]
    assert diffusion[0] == 0.0  # the start, with a line for people
    assert "8 steps" in recorder.stage("diffusion")[0]["message"]
    assert diffusion[1:] == [step / 8.0 for step in range(1, 9)]
    assert diffusion == sorted(diffusion)
    decode = recorder.stage("decode")
    assert len(decode) == 1 and recorder.events[-1] == ("progress", decode[0])
    assert [kind for kind, _ in recorder.events] == ["progress"] * 10


def test_cancel_from_progress_stops_between_steps(engine):
    before = engine.model.steps_run
    recorder = Recorder(cancel_at=0.3)
    with pytest.raises(Cancelled):
        generate(engine, recorder.ctx, steps=10, seed=3)
    # Cancelled at step 3 of 10 (fraction 0.3): no later step ran, nothing was decoded.
    assert engine.model.steps_run - before == 3
    assert [v["fraction"] for v in recorder.stage("diffusion")][-1] == pytest.approx(0.3)
    assert recorder.stage("decode") == [] and engine.vae.decodes == 0
    # The engine serves the next call, and the seed still reproduces.
    assert numpy.array_equal(generate(engine, seed=3)["audio"], generate(engine, seed=3)["audio"])


def test_cancel_after_the_last_step_skips_the_decode(engine):
    recorder = Recorder(cancel_at=1.0)
    with pytest.raises(Cancelled):
        generate(engine, recorder.ctx, steps=4, seed=3)
    assert engine.vae.decodes == 0


def test_cancel_before_the_call_runs_nothing(engine):
    ctx = make_ctx()
    ctx.cancel()
    with pytest.raises(Cancelled):
        generate(engine, ctx)
    assert engine.model.calls == []


# --- argument checks ---------------------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    ({"prompt": ""}, "generate: prompt is empty: describe the sound"),
    ({"prompt": "   \n"}, "generate: prompt is empty"),
    ({"prompt": 42}, "generate: prompt must be a string describing the sound, not int"),
    ({"prompt": None}, "generate: prompt must be a string describing the sound, not NoneType"),
    ({"prompt": "x" * 2001}, "generate: prompt has 2001 characters, at most 2000 are accepted"),
    ({"duration": 0.5}, "generate: duration must be from 1 to 30 seconds, not 0.5"),
    ({"duration": 31}, "generate: duration must be from 1 to 30 seconds, not 31.0"),
    ({"duration": float("nan")}, "generate: duration must be from 1 to 30 seconds, not nan"),
    ({"duration": "10"}, "generate: duration must be a number, not str"),
    ({"duration": True}, "generate: duration must be a number, not bool"),
    ({"steps": 0}, "generate: steps must be from 1 to 200, not 0"),
    ({"steps": 201}, "generate: steps must be from 1 to 200, not 201"),
    ({"steps": 25.0}, "generate: steps must be an integer, not float"),
    ({"guidance_scale": 1}, "generate: guidance_scale must be more than 1 and at most 20, not 1.0"),
    ({"guidance_scale": 0.5}, "generate: guidance_scale must be more than 1 and at most 20"),
    ({"guidance_scale": 21}, "generate: guidance_scale must be more than 1 and at most 20, "
                             "not 21.0"),
    ({"guidance_scale": "high"}, "generate: guidance_scale must be a number, not str"),
    ({"seed": -1}, "generate: seed must be from 0 to 9223372036854775807, not -1"),
    ({"seed": 2**63}, "generate: seed must be from 0 to 9223372036854775807"),
    ({"seed": 1.5}, "generate: seed must be an integer from 0 to 2**63-1 or null for a random "
                    "one, not float"),
    ({"seed": "7"}, "generate: seed must be an integer"),
    ({"seed": False}, "generate: seed must be an integer"),
])
def test_bad_arguments_are_named(engine, arguments, message):
    with pytest.raises(BadArguments) as info:
        generate(engine, **arguments)
    assert info.value.message.startswith(message), info.value.message
    assert engine.model.calls == []  # refused before the model ran


def test_the_runtime_checks_annotated_types_first(engine):
    method = operations_of(engine)["generate"]
    check_arguments(method, make_ctx(), {"prompt": "rain", "duration": 3, "seed": None})
    with pytest.raises(BadArguments) as info:
        check_arguments(method, make_ctx(), {"prompt": "rain", "steps": "many"})
    assert "'steps' must be int" in info.value.message
    with pytest.raises(BadArguments) as info:
        check_arguments(method, make_ctx(), {"prompt": "rain", "length": 3})
    assert "accepted arguments: prompt, duration, steps, guidance_scale, seed" in \
        info.value.message


def test_upstreams_unguided_branch_is_never_reached(engine):
    # At guidance_scale <= 1 upstream's inference_flow raises a TypeError (its
    # unguided branch is broken at the pinned commit); the stand-in mirrors it.
    with pytest.raises(TypeError):
        engine.model.inference_flow("rain", num_inference_steps=1, guidance_scale=1.0)
    with pytest.raises(BadArguments):
        generate(engine, guidance_scale=1.0)


# --- offline ---------------------------------------------------------------------------


def test_constructing_the_engine_switches_the_hub_off(weights, offline_env):
    assert "HF_HUB_OFFLINE" not in os.environ
    StandInEngine(device="cpu", **weights)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[name] == "1"


def test_load_switches_the_hub_off_again(engine, offline_env):
    engine.unload()
    offline_env.setenv("HF_HUB_OFFLINE", "0")
    engine.load()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("option, value", [
    ("text_encoder_dir", "google/flan-t5-large"),
    ("model_dir", "declare-lab/TangoFlux"),
    ("vae_dir", "stabilityai/stable-audio-open-1.0"),
])
def test_a_hub_name_is_refused_before_anything_is_built(weights, offline_env, option, value):
    builds = StandInEngine.builds
    engine = StandInEngine(device="cpu", **dict(weights, **{option: value}))
    with pytest.raises(RuntimeError) as info:
        engine.load()
    message = str(info.value)
    assert "{} must be an absolute local path, not {!r} (a Hugging Face hub name?)".format(
        option, value) in message
    assert "never downloads" in message and "huggingface-cli download" in message
    assert StandInEngine.builds == builds and engine.model is None


def test_the_real_build_asks_for_local_files_only():
    # The one from_pretrained call the engine makes itself (the VAE from
    # vae_dir) says local_files_only; upstream's T5 loading gets a checked local
    # directory and the offline environment. Read from the source, since the
    # real build needs the daemon's venv (see the selfcheck test below).
    import inspect
    source = inspect.getsource(TangoFluxEngine._build_model)
    assert "from_pretrained(self.vae_dir, local_files_only=True)" in source
    assert "TangoFlux(config, text_encoder_dir=self.text_encoder_dir)" in source
    assert "HF_HUB_OFFLINE" in source


# --- preflight -------------------------------------------------------------------------


def test_preflight_is_empty_when_everything_is_there(weights):
    assert TangoFluxEngine.preflight(weights) == []
    assert TangoFluxEngine.preflight(write_placeholder_weights(
        os.path.dirname(weights["model_dir"]), vae_dir=True)) == []


def test_preflight_names_missing_directories_with_their_exact_paths(tmp_path):
    model_dir, text_dir, vae_dir = (str(tmp_path / name) for name in ("tf", "t5", "vae"))
    problems = TangoFluxEngine.preflight({"model_dir": model_dir, "text_encoder_dir": text_dir,
                                          "vae_dir": vae_dir})
    assert problems == [
        "model_dir: TangoFlux weights not found at {0}: expected a directory holding "
        "config.json and tangoflux.safetensors (huggingface-cli download declare-lab/TangoFlux "
        "--include '*.json' '*.safetensors' --local-dir {0}; see daemons/tangoflux/README.md)"
        .format(model_dir),
        "text_encoder_dir: flan-t5-large text encoder not found at {0}: expected a directory "
        "holding config.json, tokenizer.json, tokenizer_config.json and model.safetensors or "
        "pytorch_model.bin or model.safetensors.index.json or pytorch_model.bin.index.json "
        "(huggingface-cli download google/flan-t5-large --include '*.json' '*.model' "
        "model.safetensors --local-dir {0}; see daemons/tangoflux/README.md)".format(text_dir),
        "vae_dir: Oobleck VAE not found at {0}: expected a directory holding config.json and "
        "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin (gated: accept the "
        "license at huggingface.co/stabilityai/stable-audio-open-1.0, `huggingface-cli login`, "
        "then huggingface-cli download stabilityai/stable-audio-open-1.0 --include 'vae/*' "
        "--local-dir {1}; or leave vae_dir unset to use model_dir/vae.safetensors; see "
        "daemons/tangoflux/README.md)".format(vae_dir, str(tmp_path)),
    ]


def test_preflight_names_missing_files(weights, tmp_path):
    options = write_placeholder_weights(tmp_path)
    os.remove(os.path.join(options["model_dir"], "vae.safetensors"))
    os.remove(os.path.join(options["text_encoder_dir"], "tokenizer.json"))
    os.remove(os.path.join(options["text_encoder_dir"], "model.safetensors"))
    problems = TangoFluxEngine.preflight(options)
    assert len(problems) == 2
    assert problems[0].startswith(
        "model_dir: TangoFlux weights at {} lacks vae.safetensors (it should hold config.json, "
        "tangoflux.safetensors and vae.safetensors; huggingface-cli download "
        "declare-lab/TangoFlux".format(options["model_dir"]))
    assert problems[1].startswith(
        "text_encoder_dir: flan-t5-large text encoder at {} lacks tokenizer.json and "
        "model.safetensors or pytorch_model.bin or ".format(options["text_encoder_dir"]))
    # With a VAE directory, model_dir needs no vae.safetensors.
    vae_options = write_placeholder_weights(tmp_path / "other", vae_dir=True)
    os.remove(os.path.join(vae_options["model_dir"], "vae.safetensors"))
    assert TangoFluxEngine.preflight(vae_options) == []


def test_preflight_spots_git_lfs_pointers(tmp_path):
    options = write_placeholder_weights(tmp_path)
    pointer = os.path.join(options["model_dir"], "tangoflux.safetensors")
    with open(pointer, "w") as handle:
        handle.write("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 3\n")
    problems = TangoFluxEngine.preflight(options)
    assert len(problems) == 1
    assert problems[0].startswith("model_dir: {} is only 63 bytes: a Git LFS pointer or an "
                                  "interrupted download, not the weights".format(pointer))


def test_preflight_unset_and_mistyped_options():
    problems = TangoFluxEngine.preflight({"text_encoder_dir": 3})
    assert problems[0].startswith("model_dir is not set: the absolute path of a local directory "
                                  "(huggingface-cli download declare-lab/TangoFlux")
    assert problems[1] == "text_encoder_dir must be a path (a string), not int"
    assert len(problems) == 2  # no vae_dir: the default, model_dir/vae.safetensors


def test_load_refuses_what_preflight_finds(tmp_path, offline_env):
    engine = StandInEngine(device="cpu", model_dir=str(tmp_path / "absent"),
                           text_encoder_dir=str(tmp_path / "absent-too"))
    with pytest.raises(RuntimeError) as info:
        engine.load()
    assert str(info.value).startswith("tangoflux: cannot load: model_dir: TangoFlux weights "
                                      "not found at {}".format(tmp_path / "absent"))
    assert str(tmp_path / "absent-too") in str(info.value)


def test_preflight_imports_nothing_heavy(weights):
    code = ("import sys, json; from modelhost.daemons.tangoflux.engine import TangoFluxEngine; "
            "print(json.dumps(TangoFluxEngine.preflight(json.loads(sys.argv[1])))); "
            "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'tangoflux') "
            "if m in sys.modules]; assert not heavy, heavy")
    import json
    done = subprocess.run([sys.executable, "-c", code, json.dumps(weights)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- tiers -----------------------------------------------------------------------------


def test_tiers_on_cpu(engine):
    assert tiers_of(engine) == ["resident", "offloaded", "unloaded"]
    before = generate(engine, seed=21)["audio"]
    model, vae = engine.model, engine.vae
    engine.offload()
    assert {name: device.type for name, device in engine._homes.items()} == {
        "model": "cpu", "vae": "cpu"}
    engine.onload()
    assert engine._homes == {} and engine.model is model and engine.vae is vae
    assert numpy.array_equal(generate(engine, seed=21)["audio"], before)
    engine.unload()
    assert engine.model is None and engine.vae is None and engine.sample_rate is None
    with pytest.raises(RuntimeError) as info:
        generate(engine, seed=21)
    assert "not loaded" in str(info.value)
    engine.load()
    assert engine.loads == 2
    assert numpy.array_equal(generate(engine, seed=21)["audio"], before)


def test_the_tier_attributes_hold_the_three_modules(engine):
    # Upstream's TangoFlux owns the text encoder and the transformer; `vae` is the third.
    assert TangoFluxEngine.torch_module_attributes == ("model", "vae")
    assert isinstance(engine.model, TangoFluxStandIn) and isinstance(engine.vae, OobleckVAEStandIn)
    assert isinstance(engine.model.text_encoder, torch.nn.Module)
    assert isinstance(engine.model.transformer, torch.nn.Module)
    engine.offload()
    assert all(p.device.type == "cpu" for p in engine.model.parameters())
    engine.onload()


def test_a_vae_that_is_not_44100_hz_is_refused(weights, offline_env):
    class Wrong(StandInEngine):
        def _build_model(self):
            model, vae = super(Wrong, self)._build_model()
            vae.config.sampling_rate = 48000
            return model, vae

    with pytest.raises(RuntimeError) as info:
        Wrong(device="cpu", **weights).load()
    assert "48000 Hz, expected 44100 Hz" in str(info.value)


# --- the module itself -------------------------------------------------------------------


def test_the_engine_module_compiles_on_python_3_10():
    import glob
    pythons = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python")))
    if not pythons:
        pytest.skip("no Python 3.10 under pyenv")
    files = sorted(glob.glob(str(ROOT / "daemons" / "tangoflux" / "*.py")))
    done = subprocess.run([pythons[-1], "-m", "py_compile"] + files, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TANGOFLUX_PYTHON"),
                    reason="set TANGOFLUX_PYTHON to the tangoflux venv's python to run the real "
                           "model code on tiny weights")
def test_selfcheck_in_the_daemon_venv():
    done = subprocess.run([os.environ["TANGOFLUX_PYTHON"], "-m",
                           "modelhost.daemons.tangoflux.selfcheck", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "all checks passed" in done.stdout, (
        done.stdout[-4000:] + done.stderr[-4000:])


# --- end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_through_modelhost_up(make_host, weights):
    options = "{{model_dir: {model_dir}, text_encoder_dir: {text_encoder_dir}, device: cpu}}"
    host = make_host([daemon_yaml(
        "sfx", engine="tangoflux_standin_engine:TangoFluxStandInEngine",
        options=options.format(**weights), max_payload="64MiB")]).start()
    host.wait_ready("sfx")
    progress = []
    client = host.client()
    result = client.call("sfx", "generate", prompt="rain on a tin roof", duration=3, steps=6,
                         seed=42, timeout=120, on_progress=progress.append)
    audio = result["audio"]
    assert isinstance(audio, numpy.ndarray)
    assert audio.dtype == numpy.float32 and audio.shape == (132300, 2)
    assert result["sample_rate"] == 44100 and result["seed"] == 42
    assert [p.fraction for p in progress if p.stage == "diffusion"] == [
        0.0] + [step / 6.0 for step in range(1, 7)]
    # The same as in this process: the payload arrived whole.
    local = StandInEngine(device="cpu", **weights)
    local.load()
    expected = generate(local, duration=3, steps=6, seed=42)["audio"]
    assert numpy.allclose(audio, expected, atol=1e-6)

    again = client.call("sfx", "generate", prompt="rain on a tin roof", duration=3, steps=6,
                        seed=42, timeout=120)
    # The same seed, the same sound: to float precision, since torch's CPU threads
    # may sum in another order from one call to the next.
    assert numpy.allclose(again["audio"], audio, atol=1e-6)
    drawn = client.call("sfx", "generate", prompt="rain on a tin roof", duration=1, steps=2,
                        timeout=120)
    assert isinstance(drawn["seed"], int) and drawn["audio"].shape == (44100, 2)

    import modelhost
    with pytest.raises(modelhost.BadArguments) as info:
        client.call("sfx", "generate", prompt="", timeout=30)
    assert "prompt is empty" in str(info.value)
