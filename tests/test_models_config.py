"""config/models.yaml, and the three model daemons on a machine without their files.

The real engines run here (on the host's interpreter, venv: false), with
option paths that do not exist: setup's preflight and the daemon's start must
both name the exact paths, and the daemon must stay up as `failed`.
"""

import sys

import pytest

from modelhost.broker import envs
from modelhost.broker.config import DaemonConfig, load_config

from conftest import ROOT, daemon_yaml

ENGINES = {
    "cosyvoice": ("modelhost.daemons.cosyvoice.engine:CosyVoiceEngine",
                  lambda root: {"checkout": root / "CosyVoice",
                                "model_dir": root / "CosyVoice2-0.5B"}),
    "tangoflux": ("modelhost.daemons.tangoflux.engine:TangoFluxEngine",
                  lambda root: {"model_dir": root / "TangoFlux",
                                "text_encoder_dir": root / "flan-t5-large"}),
    "talkinggaussian": ("modelhost.daemons.talkinggaussian.engine:TalkingGaussianEngine",
                        lambda root: {"checkout": root / "TalkingGaussian",
                                      "data_dir": root / "data" / "obama",
                                      "model_dir": root / "output" / "obama",
                                      "hubert_dir": root / "hubert"}),
}


def test_models_yaml_is_valid_and_names_real_requirements_files():
    config = load_config(ROOT / "config" / "models.yaml")
    assert {"cosyvoice", "tangoflux", "talkinggaussian"} <= set(config.daemons)
    for daemon in config.daemons.values():
        assert daemon.requirements is not None and daemon.requirements.is_file(), daemon.name
        assert daemon.declared_resident, daemon.name  # every model declares its footprint
    assert config.daemons["cosyvoice"].python == "3.10"
    assert config.daemons["talkinggaussian"].python == "3.7"
    assert config.daemons["cosyvoice"].priority == "interactive"


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_setup_prints_the_missing_files_with_their_paths(name, tmp_path):
    engine, options = ENGINES[name]
    options = {key: str(value) for key, value in options(tmp_path).items()}
    daemon = DaemonConfig(name=name, engine=engine, python=sys.executable, options=options)
    problems = envs.preflight(daemon)
    assert problems, "{} reported nothing missing".format(name)
    text = "\n".join(problems)
    for path in options.values():
        if name != "talkinggaussian" or path.endswith("TalkingGaussian"):
            assert path in text, "{} does not name {}:\n{}".format(name, path, text)


@pytest.mark.slow
def test_a_model_daemon_without_its_files_shows_failed_with_the_paths(make_host, tmp_path):
    engine, options = ENGINES["tangoflux"]
    options = options(tmp_path)
    host = make_host([daemon_yaml("tangoflux", engine=engine, options="{" + ", ".join(
        "{}: {}".format(k, v) for k, v in options.items()) + "}")]).start()
    status = host.wait_for(lambda s: s["daemons"][0]["state"] == "failed",
                           what="the daemon to fail")
    error = status["daemons"][0]["last_error"]
    assert str(options["model_dir"]) in error and str(options["text_encoder_dir"]) in error
