"""Tests of modelhost.broker.config: loading, defaults, and errors with exact lines."""

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from modelhost.broker.config import (
    BrokerConfig, Config, ConfigError, DaemonConfig, DeviceLimit, MemoryConfig, RestartPolicy,
    daemon_spec, default_config_path, format_size, load_config, parse_config, parse_size,
)
from modelhost.broker.envs import find_base_interpreter, interpreter_for

MINIMAL = """\
daemons:
  espeak:
    engine: modelhost.daemons.espeak.engine:EspeakEngine
    python: "3.12"
"""


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Defaults come from the environment: pin them so tests don't see the host's."""
    monkeypatch.setenv("MODELHOST_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MODELHOST_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)


def parse(text, path=None):
    return parse_config(textwrap.dedent(text), path)


def errors(text, path=None):
    with pytest.raises(ConfigError) as info:
        parse(text, path)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- happy paths --------------------------------------------------------------------

def test_all_defaults(tmp_path):
    config = parse(MINIMAL)
    run, state = tmp_path / "run", tmp_path / "state"
    assert config.path is None
    assert config.broker == BrokerConfig(
        runtime_dir=run, state_dir=state,
        frontend=f"ipc://{run}/frontend.sock", backend=f"ipc://{run}/backend.sock",
        events=f"ipc://{run}/events.sock")
    assert config.broker.http == ("127.0.0.1", 9466)
    assert config.broker.heartbeat_s == 1.0 and config.broker.liveness == 3
    assert config.broker.client_liveness_s == 10.0
    assert config.broker.max_payload_bytes == 256 * 2**20
    assert config.broker.max_reply_bytes == 256 * 2**20
    assert config.broker.log_level == "info"
    assert config.daemons == {"espeak": DaemonConfig(
        name="espeak", engine="modelhost.daemons.espeak.engine:EspeakEngine", python="3.12",
        venv=state / "venvs" / "espeak", requirements=None, options={}, pythonpath=(), env={},
        line=2)}
    daemon = config.daemons["espeak"]
    assert (daemon.concurrency, daemon.max_queue, daemon.max_payload_bytes) == (1, 64, None)
    assert (daemon.ready_timeout_s, daemon.stop_timeout_s, daemon.autostart) == (300.0, 10.0, True)
    assert daemon.restart == RestartPolicy(1.0, 60.0, 60.0)


def test_state_dir_fallbacks(monkeypatch, tmp_path):
    monkeypatch.delenv("MODELHOST_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert parse(MINIMAL).broker.state_dir == tmp_path / "xdg" / "modelhost"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse(MINIMAL).broker.state_dir == tmp_path / "home/.local/state/modelhost"


def test_all_keys_set(tmp_path):
    path = write(tmp_path, """\
        broker:
          runtime_dir: /srv/mh/run
          state_dir: /srv/mh/state
          frontend: "ipc://{runtime_dir}/clients.sock"
          backend: tcp://127.0.0.1:5556
          events: "ipc://{state_dir}/events.sock"
          http: "127.0.0.1:9100"
          heartbeat_s: 0.5
          liveness: 5
          client_liveness_s: 30
          max_payload: 1GiB
          log_level: DEBUG
        daemons:
          tts:
            engine: tts_engine.main:Engine
            python: /opt/py/bin/python3
            venv: false
            requirements: reqs/tts.txt
            options:
              model: big
              layers: [1, 2.5, null, true]
              nested: {a: {b: "c"}}
            pythonpath: [src, /abs/lib]
            env: {OMP_NUM_THREADS: 4, VERSION: 1.10, NAME: x}
            concurrency: 2
            max_queue: 0
            max_payload: 512MiB
            ready_timeout_s: 600
            stop_timeout_s: 2.5
            restart: {backoff_s: 0.5, max_backoff_s: 30, reset_after_s: 120}
            autostart: no
          video:
            engine: v:V
            python: "3.8.18"
            venv: venvs/video
        """)
    config = load_config(path)
    assert config.path == path
    assert config.broker == BrokerConfig(
        runtime_dir=Path("/srv/mh/run"), state_dir=Path("/srv/mh/state"),
        frontend="ipc:///srv/mh/run/clients.sock", backend="tcp://127.0.0.1:5556",
        events="ipc:///srv/mh/state/events.sock", http=("127.0.0.1", 9100), heartbeat_s=0.5, liveness=5, client_liveness_s=30.0, max_payload_bytes=2**30,
        log_level="debug")
    assert list(config.daemons) == ["tts", "video"]  # file order
    tts = config.daemons["tts"]
    assert tts == DaemonConfig(
        name="tts", engine="tts_engine.main:Engine", python="/opt/py/bin/python3", venv=None,
        requirements=tmp_path / "reqs/tts.txt",
        options={"model": "big", "layers": [1, 2.5, None, True], "nested": {"a": {"b": "c"}}},
        pythonpath=(tmp_path / "src", Path("/abs/lib")),
        env={"OMP_NUM_THREADS": "4", "VERSION": "1.10", "NAME": "x"},  # as written
        concurrency=2, max_queue=0, max_payload_bytes=512 * 2**20, ready_timeout_s=600.0,
        stop_timeout_s=2.5, restart=RestartPolicy(0.5, 30.0, 120.0), autostart=False, line=14)
    assert isinstance(tts.ready_timeout_s, float)
    video = config.daemons["video"]
    assert video.venv == tmp_path / "venvs/video" and video.line == 32


def test_relative_paths_resolve_against_the_file_or_cwd(tmp_path, monkeypatch):
    text = MINIMAL + "    venv: ../v\n    pythonpath: [lib]\n"
    sub = tmp_path / "etc"
    sub.mkdir()
    config = load_config(write(sub, text))
    assert config.daemons["espeak"].venv == tmp_path / "v"
    assert config.daemons["espeak"].pythonpath == (sub / "lib",)

    monkeypatch.chdir(sub)
    config = parse(text)
    assert config.daemons["espeak"].venv == tmp_path / "v"
    # A relative config path still anchors to its directory, and errors name it as given.
    assert load_config("config.yaml").daemons["espeak"].pythonpath == (sub / "lib",)


def test_path_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MH_ROOT", "/data/mh")
    config = parse("""\
        broker:
          runtime_dir: ~/run
          state_dir: ${MH_ROOT}/state
          backend: "ipc://{state_dir}/b.sock"
        daemons:
          a:
            engine: a:A
            python: "3.12"
            requirements: $MH_ROOT/req.txt
        """)
    assert config.broker.runtime_dir == tmp_path / "home/run"
    assert config.broker.state_dir == Path("/data/mh/state")
    assert config.broker.frontend == f"ipc://{tmp_path}/home/run/frontend.sock"
    assert config.broker.backend == "ipc:///data/mh/state/b.sock"
    assert config.daemons["a"].venv == Path("/data/mh/state/venvs/a")
    assert config.daemons["a"].requirements == Path("/data/mh/req.txt")


def test_merge_keys_share_settings():
    config = parse("""\
        daemons:
          a: &common
            engine: x.y:Z
            python: "3.12"
            concurrency: 3
          b:
            <<: *common
            concurrency: 4
        """)
    assert config.daemons["a"].concurrency == 3
    assert config.daemons["b"].concurrency == 4 and config.daemons["b"].engine == "x.y:Z"


def test_empty_daemons_mapping_is_allowed():
    assert parse("daemons: {}\n").daemons == {}


@pytest.mark.parametrize("text, expected", [
    (1024, 1024),
    ("512", 512),
    ("10B", 10),
    ("512k", 512 * 1024),
    ("512K", 512 * 1024),
    ("2m", 2 * 2**20),
    ("1g", 2**30),
    ("256MiB", 256 * 2**20),
    ("3 KiB", 3 * 1024),
    ("1GiB", 2**30),
    ("1.5 GB", 1_500_000_000),
    ("2MB", 2_000_000),
    ("4kb", 4000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "12 parsecs", "1.2.3k", "-5", True, 1.5, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_size_in_config():
    config = parse(MINIMAL.replace("daemons:", "broker:\n  max_payload: 1.5 GB\ndaemons:"))
    assert config.broker.max_payload_bytes == 1_500_000_000


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:5555", "tcp://127.1.2.3:80", "tcp://localhost:5555", "tcp://[::1]:5555",
    "inproc://broker", "ipc:///tmp/x.sock",
])
def test_accepted_endpoints(endpoint):
    assert parse(f"broker:\n  frontend: {endpoint}\n" + MINIMAL).broker.frontend == endpoint


# --- errors, with exact lines -------------------------------------------------------

def test_unknown_key_with_suggestion():
    assert errors("""\
        daemons:
          espeak:
            engine: a.b:C
            python: "3.12"
            concurency: 2
            colour: blue
        """, Path("config.yaml")) == [
        "config.yaml:5: daemons.espeak.concurency: unknown key; did you mean 'concurrency'?",
        "config.yaml:6: daemons.espeak.colour: unknown key (expected one of: engine, python, "
        "venv, requirements, options, pythonpath, env, concurrency, max_queue, max_payload, "
        "ready_timeout_s, stop_timeout_s, restart, autostart, memory, device, pin, "
        "idle_ttl_s, preload, priority)",
    ]


def test_unknown_top_level_and_broker_keys():
    assert errors("brokr: {}\nbroker:\n  log_levl: info\n" + MINIMAL) == [
        "<string>:1: brokr: unknown key; did you mean 'broker'?",
        "<string>:3: broker.log_levl: unknown key; did you mean 'log_level'?",
    ]


def test_wrong_types():
    assert errors("""\
        broker:
          heartbeat_s: fast
          liveness: 0
          log_level: verbose
        daemons:
          espeak:
            engine: a.b:C
            python: "3.12"
            concurrency: two
            max_queue: -1
            autostart: "yes"
            ready_timeout_s: true
            stop_timeout_s: 0
            options: [1, 2]
            pythonpath: lib
            env: {FLAG: yes, 1BAD: x}
            max_payload: lots
        """, Path("config.yaml")) == [
        "config.yaml:2: broker.heartbeat_s: expected a positive number of seconds, got 'fast'",
        "config.yaml:3: broker.liveness: expected a positive integer, got 0",
        "config.yaml:4: broker.log_level: expected one of debug, info, warning, error, "
        "got 'verbose'",
        "config.yaml:9: daemons.espeak.concurrency: expected a positive integer, got 'two'",
        "config.yaml:10: daemons.espeak.max_queue: expected an integer >= 0, got -1",
        "config.yaml:11: daemons.espeak.autostart: expected true or false, got 'yes'",
        "config.yaml:12: daemons.espeak.ready_timeout_s: expected a positive number of "
        "seconds, got true",
        "config.yaml:13: daemons.espeak.stop_timeout_s: expected a positive number of "
        "seconds, got 0",
        "config.yaml:14: daemons.espeak.options: expected a mapping, got a list",
        "config.yaml:15: daemons.espeak.pythonpath: expected a list of paths, got 'lib'",
        "config.yaml:16: daemons.espeak.env.FLAG: expected a string or a number, got yes; "
        "quote it",
        "config.yaml:16: daemons.espeak.env.1BAD: not a valid environment variable name",
        "config.yaml:17: daemons.espeak.max_payload: expected a size in bytes, like 1048576, "
        "\"256MiB\" or \"1.5 GB\", got 'lots'",
    ]


def test_missing_required_keys_point_at_the_section():
    assert errors("""\
        daemons:
          ok:
            engine: a.b:C
            python: "3.12"
          espeak:
            concurrency: 2
        """) == [
        "<string>:5: daemons.espeak.engine: required key is missing",
        "<string>:5: daemons.espeak.python: required key is missing",
    ]


def test_missing_daemons_section():
    assert errors("\n\nbroker:\n  liveness: 3\n") == [
        "<string>:3: daemons: required section is missing"]


def test_unquoted_python_version():
    (message,) = errors(MINIMAL.replace('"3.12"', "3.10"), Path("config.yaml"))
    assert message == ('config.yaml:4: daemons.espeak.python: expected a version string, got '
                       'the number 3.10 (YAML reads 3.10 as 3.1); quote it: python: "3.10"')
    (message,) = errors(MINIMAL.replace('"3.12"', "3.12"))
    assert message.startswith("<string>:4: daemons.espeak.python:")
    assert 'quote it: python: "3.12"' in message


@pytest.mark.parametrize("value, line", [("three", 4), ("'3'", 4), ("3.x.1", 4)])
def test_bad_python_version(value, line):
    (message,) = errors(MINIMAL.replace('"3.12"', value))
    assert message.startswith(f"<string>:{line}: daemons.espeak.python: expected a version")


def test_bad_engine_and_name():
    assert errors("""\
        daemons:
          espeak:
            engine: modelhost.daemons.espeak.EspeakEngine
            python: "3.12"
          Fancy Name:
            engine: a:B
            python: "3.12"
        """) == [
        "<string>:3: daemons.espeak.engine: expected 'package.module:ClassName', got "
        "'modelhost.daemons.espeak.EspeakEngine'",
        "<string>:5: daemons.Fancy Name: invalid daemon name: names are 1 to 40 characters "
        "of lowercase letters, digits, '_' and '-', starting with a letter",
    ]


@pytest.mark.parametrize("endpoint, problem", [
    ("http://127.0.0.1:80", "expected an endpoint starting with ipc://, tcp:// or inproc://"),
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
    ("tcp://127.0.0.1:99999", "expected tcp://HOST:PORT"),
    ("ipc://", "has no path"),
    ("ipc://{runtime}/x.sock", "unknown placeholder {runtime}"),
    ("ipc:///" + "x" * 120, "longer than the 107 a unix socket allows"),
])
def test_bad_endpoint(endpoint, problem):
    (message,) = errors(f"broker:\n  log_level: info\n  backend: '{endpoint}'\n" + MINIMAL)
    assert message.startswith("<string>:3: broker.backend: ")
    assert problem in message


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "10.1.2.3", "example.com", "[::]", "eth0"])
def test_non_loopback_tcp_needs_curve(host):
    (message,) = errors(f"broker:\n  frontend: tcp://{host}:5555\n" + MINIMAL)
    assert message.startswith("<string>:2: broker.frontend: ")
    assert "non-loopback tcp needs CURVE authentication, which is not configured here" in message


def test_same_frontend_and_backend():
    (message,) = errors("broker:\n  frontend: tcp://127.0.0.1:1\n"
                        "  backend: tcp://127.0.0.1:1\n" + MINIMAL)
    assert message.startswith("<string>:3: broker.backend: frontend and backend are the same")


def test_yaml_syntax_errors(tmp_path):
    path = write(tmp_path, MINIMAL + "  bad:\n    options: [1, 2\n    engine: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (message,) = info.value.errors
    assert message.startswith(f"{path}:7: YAML syntax error: ")
    assert "(while parsing a flow sequence at line 6)" in message

    (message,) = errors("daemons:\n  a: b\n c: d\n")
    assert message.startswith("<string>:3: YAML syntax error: ")


def test_yaml_traps():
    # A control character is a reader error: it carries a position, reported as a line.
    assert errors("daemons:\n  a: 1\n  x: \x00\n") == [
        "<string>:3: YAML syntax error: character #x0000 is not allowed "
        "(special characters are not allowed)"]
    # `yes` is a boolean to YAML 1.1, even as a key.
    assert errors("daemons:\n  yes: {engine: a:B, python: '3.12'}\n") == [
        "<string>:2: daemons: keys must be strings, got yes; quote it"]
    (message,) = errors("a: 1\n---\nb: 2\n")
    assert message.startswith("<string>:2: YAML syntax error: ")


def test_several_errors_reported_together_in_file_order():
    assert errors("""\
        daemons:
          espeak:
            engine: a.b:C
            python: 3.10
            concurrency: 0
            venv: true
            restart: {backoff_s: 10, max_backoff_s: 5, jitter: 1}
        broker:
          max_payload: 1k
          liveness: 2
          liveness: 4
        """) == [
        "<string>:4: daemons.espeak.python: expected a version string, got the number 3.10 "
        "(YAML reads 3.10 as 3.1); quote it: python: \"3.10\"",
        "<string>:5: daemons.espeak.concurrency: expected a positive integer, got 0",
        "<string>:6: daemons.espeak.venv: expected a path or false, got true",
        "<string>:7: daemons.espeak.restart.jitter: unknown key (expected one of: backoff_s, "
        "max_backoff_s, reset_after_s)",
        "<string>:7: daemons.espeak.restart.max_backoff_s: max_backoff_s (5.0) is below "
        "backoff_s (10.0)",
        "<string>:11: broker.liveness: duplicate key (first at line 10)",
    ]


def test_daemon_payload_above_broker_limit():
    (message,) = errors("broker:\n  max_payload: 1k\n" + MINIMAL + "    max_payload: 2k\n")
    assert message == ("<string>:7: daemons.espeak.max_payload: 2048 bytes exceeds "
                       "broker.max_payload (1024 bytes)")


def test_options_must_be_json_values():
    assert errors(MINIMAL + """\
    options:
      when: 2024-01-01
      tags: !!set {a, b}
      bad-name: 1
      custom: !thing x
      ok: [1, {a: 2}]
""") == [
        "<string>:6: daemons.espeak.options.when: date cannot be passed to a daemon "
        "(its spec is JSON); quote it to pass a string",
        "<string>:7: daemons.espeak.options.tags: a value tagged !!set cannot be passed "
        "to a daemon",
        "<string>:8: daemons.espeak.options.bad-name: option names must be Python identifiers",
        "<string>:9: daemons.espeak.options.custom: a value tagged !thing cannot be passed "
        "to a daemon (its spec is JSON); quote it to pass a string",
    ]


def test_unset_environment_variable(monkeypatch):
    monkeypatch.delenv("MH_NOT_SET", raising=False)
    assert errors(MINIMAL + "    venv: $MH_NOT_SET/venv\n") == [
        "<string>:5: daemons.espeak.venv: environment variable $MH_NOT_SET is not set"]


def test_not_a_mapping_and_empty():
    assert errors("- a\n- b\n") == ["<string>:1: expected a mapping, got a list"]
    assert errors("\n") == [
        "<string>:1: the configuration is empty; expected a mapping with a 'daemons' section"]
    assert errors("daemons:\n") == ["<string>:1: daemons: expected a mapping, got nothing (null)"]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the configuration"):
        load_config(tmp_path / "nope.yaml")


# --- daemon spec and interpreters -----------------------------------------------------

def test_daemon_spec(tmp_path):
    config = parse(MINIMAL + """\
    options: {voice: en, speed: 1.5}
    pythonpath: [/opt/lib]
    concurrency: 2
broker:
  heartbeat_s: 0.25
  liveness: 4
  log_level: warning
""")
    spec = daemon_spec(config, "espeak", parent_pid=1234)
    assert spec == {
        "name": "espeak",
        "engine": "modelhost.daemons.espeak.engine:EspeakEngine",
        "options": {"voice": "en", "speed": 1.5},
        "backend": f"ipc://{tmp_path}/run/backend.sock",
        "heartbeat_s": 0.25,
        "liveness": 4,
        "concurrency": 2,
        "max_reply_bytes": 256 * 2**20,
        "pythonpath": ["/opt/lib"],
        "log_level": "warning",
        "parent_pid": 1234,
        # Large payloads: where the segments live ($MODELHOST_SHM_DIR, set by conftest).
        "shm": {"dir": os.environ["MODELHOST_SHM_DIR"], "threshold": 2**20,
                "max_total": 2**30},
    }
    assert json.loads(json.dumps(spec)) == spec
    spec["options"]["voice"] = "fr"  # the spec is a copy
    assert config.daemons["espeak"].options["voice"] == "en"
    assert daemon_spec(config, "espeak")["parent_pid"] is None
    with pytest.raises(KeyError, match="known: espeak"):
        daemon_spec(config, "nope")


def test_interpreter_for(tmp_path):
    config = parse(MINIMAL)
    assert interpreter_for(config.daemons["espeak"]) == tmp_path / "state/venvs/espeak/bin/python"
    exe = tmp_path / "py"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    daemon = parse(MINIMAL.replace('"3.12"', str(exe)) + "    venv: false\n").daemons["espeak"]
    assert daemon.venv is None
    assert interpreter_for(daemon) == exe


def test_find_base_interpreter_real_38():
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    if not list(pyenv.glob("3.8.*")) and not shutil.which("python3.8"):
        pytest.skip("no python 3.8 here")
    exe = find_base_interpreter("3.8")
    assert exe.name == "python3.8" and os.access(exe, os.X_OK)


def test_find_base_interpreter_pyenv_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for version in ("3.9.2", "3.9.10", "3.9.11t", "3.10.1"):
        exe = tmp_path / "versions" / version / "bin" / ("python" + version[:3].rstrip("."))
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    # Newest patch by number (10 > 2), skipping the free-threaded "t" build.
    assert find_base_interpreter("3.9") == tmp_path / "versions/3.9.10/bin/python3.9"
    assert find_base_interpreter("3.9.2") == tmp_path / "versions/3.9.2/bin/python3.9"
    with pytest.raises(FileNotFoundError, match=r"3\.9\.7"):
        find_base_interpreter("3.9.7")


def test_find_base_interpreter_bogus():
    with pytest.raises(FileNotFoundError) as info:
        find_base_interpreter("3.99")
    assert "versions/3.99.*" in str(info.value) and "python3.99 on PATH" in str(info.value)
    with pytest.raises(FileNotFoundError, match="not an executable file"):
        find_base_interpreter("/no/such/python")
    with pytest.raises(ValueError):
        find_base_interpreter("three")


def test_default_config_path():
    path = default_config_path()
    assert isinstance(path, Path) and path.name == "default.yaml"
    assert path.parent.name == "config"


def test_config_is_frozen():
    config = parse(MINIMAL)
    assert isinstance(config, Config)
    with pytest.raises(AttributeError):
        config.broker.liveness = 9


# --- memory: the broker's section ------------------------------------------------------

GiB = 2**30


def memory_of(section):
    """The MemoryConfig of a broker.memory section given as YAML lines under `memory:`."""
    text = "broker:\n  memory:\n" + textwrap.indent(textwrap.dedent(section), "    ") + MINIMAL
    return parse_config(text).broker.memory


def memory_errors(section):
    text = "broker:\n  memory:\n" + textwrap.indent(textwrap.dedent(section), "    ") + MINIMAL
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


def test_memory_defaults():
    memory = parse(MINIMAL).broker.memory
    assert memory == MemoryConfig()
    assert memory.probe == "auto"
    assert memory.default == DeviceLimit(threshold_fraction=0.9, threshold_bytes=None,
                                         external="count")
    assert memory.devices == {}
    assert (memory.sample_s, memory.aging_s, memory.max_skips, memory.priority_window_s) == (
        0.2, 30.0, 4, 60.0)
    assert memory.limit_for("gpu0") is memory.default
    assert memory.limit_for("host") is memory.default


def test_memory_all_keys():
    memory = memory_of("""\
        probe: nvml
        threshold: 0.8
        external: ignore
        devices:
          gpu0: {threshold: 70GiB, external: count}
          gpu1: {external: count}
          gpu12: {threshold: 0.5}
          host: 2GiB
        sample_s: 0.5
        aging_s: 10
        max_skips: 0
        priority_window_s: 0
        """)
    assert memory == MemoryConfig(
        probe="nvml",
        default=DeviceLimit(threshold_fraction=0.8, external="ignore"),
        devices={
            "gpu0": DeviceLimit(threshold_fraction=None, threshold_bytes=70 * GiB,
                                external="count"),
            # What an override leaves out comes from the section's defaults.
            "gpu1": DeviceLimit(threshold_fraction=0.8, external="count"),
            "gpu12": DeviceLimit(threshold_fraction=0.5, external="ignore"),
            "host": DeviceLimit(threshold_fraction=None, threshold_bytes=2 * GiB,
                                external="ignore"),
        },
        sample_s=0.5, aging_s=10.0, max_skips=0, priority_window_s=0.0)
    assert memory.limit_for("gpu0").threshold_bytes == 70 * GiB
    assert memory.limit_for("gpu3") == DeviceLimit(threshold_fraction=0.8, external="ignore")


def test_memory_size_threshold_as_default():
    memory = memory_of("threshold: 512MiB\ndevices: {gpu0: 0.75}\n")
    assert memory.default == DeviceLimit(threshold_fraction=None, threshold_bytes=512 * 2**20)
    assert memory.devices["gpu0"] == DeviceLimit(threshold_fraction=0.75)


@pytest.mark.parametrize("written, fraction, size", [
    ("0.9", 0.9, None),
    ("1", 1.0, None),
    ("1.0", 1.0, None),
    ("0.05", 0.05, None),
    ("'0.5'", 0.5, None),
    ("'90%'", 0.9, None),
    ("'100%'", 1.0, None),
    ("12.5%", 0.125, None),
    ("70GiB", None, 70 * GiB),
    ("'1.5 GB'", None, 1_500_000_000),
    ("512m", None, 512 * 2**20),
    ("75161927680", None, 75161927680),  # a plain number above 100 is bytes
])
def test_threshold_forms(written, fraction, size):
    limit = memory_of(f"threshold: {written}\n").default
    assert (limit.threshold_fraction, limit.threshold_bytes) == (fraction, size)


@pytest.mark.parametrize("written, problem", [
    ("0", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
          "\"70GiB\", got 0"),
    ("-0.5", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
             "\"70GiB\", got -0.5"),
    ("1.5", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
            "\"70GiB\", got 1.5; for 1.5% write 0.015 or \"1.5%\""),
    ("90", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
           "\"70GiB\", got 90; for 90% write 0.9 or \"90%\""),
    (".nan", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
             "\"70GiB\", got .nan"),
    ("lots", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
             "\"70GiB\", got 'lots'"),
    ("true", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
             "\"70GiB\", got true"),
    ("[1]", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
            "\"70GiB\", got a list"),
    ("", "expected a fraction of the device's memory in (0, 1] like 0.9, or a size like "
         "\"70GiB\", got nothing (null)"),
    ("0GiB", "expected a positive size, got '0GiB'"),
    ("'120%'", "expected a percentage above 0% and up to 100%, got '120%'"),
    ("'0%'", "expected a percentage above 0% and up to 100%, got '0%'"),
    ("'x%'", "expected a percentage above 0% and up to 100%, got 'x%'"),
])
def test_bad_threshold(written, problem):
    assert memory_errors(f"sample_s: 1\nthreshold: {written}\n") == [
        f"<string>:4: broker.memory.threshold: {problem}"]


def test_bad_memory_values_each_with_its_line():
    assert memory_errors("""\
        probe: nvlm
        external: counted
        devices:
          cuda0: 0.5
          gpu0: {threshold: 2, extrnal: ignore}
          gpu1: {external: never}
          host: [1]
          gpu2: {}
        sample_s: 0
        aging_s: -1
        max_skips: -1
        priority_window_s: -1
        thresold: 0.5
        """) == [
        "<string>:3: broker.memory.probe: expected one of auto, nvml, host, got 'nvlm'; "
        "did you mean 'nvml'?",
        "<string>:4: broker.memory.external: expected one of count, ignore, got 'counted'; "
        "did you mean 'count'?",
        "<string>:6: broker.memory.devices.cuda0: unknown device id: expected gpu0, gpu1, ... "
        "(as the NVML probe numbers them) or host",
        "<string>:7: broker.memory.devices.gpu0.extrnal: unknown key; did you mean 'external'?",
        "<string>:7: broker.memory.devices.gpu0.threshold: expected a fraction of the device's "
        "memory in (0, 1] like 0.9, or a size like \"70GiB\", got 2; for 2% write 0.02 or \"2%\"",
        "<string>:8: broker.memory.devices.gpu1.external: expected one of count, ignore, "
        "got 'never'",
        "<string>:9: broker.memory.devices.host: expected a fraction of the device's memory in "
        "(0, 1] like 0.9, or a size like \"70GiB\", got a list",
        "<string>:11: broker.memory.sample_s: expected a positive number of seconds, got 0",
        "<string>:12: broker.memory.aging_s: expected a positive number of seconds, got -1",
        "<string>:13: broker.memory.max_skips: expected an integer >= 0, got -1",
        "<string>:14: broker.memory.priority_window_s: expected a number of seconds >= 0, "
        "got -1",
        "<string>:15: broker.memory.thresold: unknown key; did you mean 'threshold'?",
    ]


def test_memory_section_must_be_a_mapping():
    assert errors("broker:\n  memory: 0.9\n" + MINIMAL) == [
        "<string>:2: broker.memory: expected a mapping, got 0.9"]
    assert errors("broker:\n  memory:\n    devices: [gpu0]\n" + MINIMAL) == [
        "<string>:3: broker.memory.devices: expected a mapping, got a list"]


def test_unknown_broker_key_suggests_memory():
    assert errors("broker:\n  memroy: {}\n" + MINIMAL) == [
        "<string>:2: broker.memroy: unknown key; did you mean 'memory'?"]


# --- memory: DeviceLimit and sizes for people ----------------------------------------

def test_budget_of_a_fraction_is_floored():
    assert DeviceLimit(threshold_fraction=0.9).budget(80 * GiB) == int(0.9 * 80 * GiB)
    assert DeviceLimit(threshold_fraction=0.5).budget(3) == 1
    assert DeviceLimit(threshold_fraction=1.0).budget(12345) == 12345
    assert DeviceLimit().budget(0) == 0


def test_budget_of_a_size_is_the_size_even_above_the_total():
    limit = DeviceLimit(threshold_fraction=None, threshold_bytes=70 * GiB)
    assert limit.budget(80 * GiB) == 70 * GiB
    assert limit.budget(16 * GiB) == 70 * GiB  # the device's own capacity bounds it then


def test_describe():
    h100 = 85520809984  # what NVML reports for an H100 80GB: 79.6 GiB
    assert DeviceLimit().describe(h100) == "90% of 79.6 GiB"
    assert DeviceLimit().describe() == "90%"
    assert DeviceLimit(threshold_fraction=0.125).describe(8 * GiB) == "12.5% of 8.0 GiB"
    assert DeviceLimit(threshold_fraction=1 / 3).describe() == "33.33%"
    assert DeviceLimit(threshold_fraction=None, threshold_bytes=2 * GiB).describe(h100) == \
        "2.0 GiB"
    assert DeviceLimit(threshold_fraction=None, threshold_bytes=512 * 2**20).describe() == \
        "512.0 MiB"


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (512 * 2**20, "512.0 MiB"), (2 * GiB, "2.0 GiB"), (85520809984, "79.6 GiB"),
    (2048 * GiB, "2048.0 GiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


# --- memory: each daemon's keys --------------------------------------------------------

def test_daemon_memory_defaults():
    daemon = parse(MINIMAL).daemons["espeak"]
    assert (daemon.declared_resident, daemon.declared_peak) == (None, None)
    assert (daemon.device, daemon.pin, daemon.idle_ttl_s, daemon.preload) == (
        None, False, None, True)


def test_daemon_memory_keys():
    config = parse("""\
        daemons:
          tts:
            engine: a.b:C
            python: "3.12"
            memory: {resident: 2GiB, peak: 512MiB}
            device: gpu1
            idle_ttl_s: 600
            preload: false
            priority: interactive
          chat:
            engine: a.b:C
            python: "3.12"
            memory: {peak: 0}
            device: host
            pin: true
          other:
            engine: a.b:C
            python: "3.12"
            memory: {}
            pin: false
            idle_ttl_s: 0.5
          nothing:
            engine: a.b:C
            python: "3.12"
            idle_ttl_s: null
        """)
    tts, chat, other, nothing = (config.daemons[n] for n in ("tts", "chat", "other", "nothing"))
    assert (tts.declared_resident, tts.declared_peak) == (2 * GiB, 512 * 2**20)
    assert (tts.device, tts.pin, tts.idle_ttl_s, tts.preload) == ("gpu1", False, 600.0, False)
    assert (tts.priority, chat.priority) == ("interactive", None)
    assert (chat.declared_resident, chat.declared_peak) == (None, 0)
    assert (chat.device, chat.pin, chat.idle_ttl_s, chat.preload) == ("host", True, None, True)
    assert (other.declared_resident, other.declared_peak) == (None, None)
    assert (other.pin, other.idle_ttl_s) == (False, 0.5)
    assert nothing.idle_ttl_s is None


def test_bad_daemon_memory_values_each_with_its_line():
    assert errors(MINIMAL + """\
    memory: {resident: lots, peek: 1GiB}
    device: cuda:0
    pin: "yes"
    idle_ttl_s: 0
    preload: 1
  other:
    engine: a.b:C
    python: "3.12"
    memory: 2GiB
    device: gpu
    idle_ttl_s: forever
  third:
    engine: a.b:C
    python: "3.12"
    memory: {resident: -1, peak: 1.5}
""") == [
        "<string>:5: daemons.espeak.memory.peek: unknown key; did you mean 'peak'?",
        "<string>:5: daemons.espeak.memory.resident: expected a size in bytes, like 1048576, "
        "\"256MiB\" or \"1.5 GB\", got 'lots'",
        "<string>:6: daemons.espeak.device: expected a device id: gpu0, gpu1, ... (as the NVML "
        "probe numbers them) or host, got 'cuda:0'",
        "<string>:7: daemons.espeak.pin: expected true or false, got 'yes'",
        "<string>:8: daemons.espeak.idle_ttl_s: expected a positive number of seconds, got 0",
        "<string>:9: daemons.espeak.preload: expected true or false, got 1",
        "<string>:13: daemons.other.memory: expected a mapping, got '2GiB'",
        "<string>:14: daemons.other.device: expected a device id: gpu0, gpu1, ... (as the NVML "
        "probe numbers them) or host, got 'gpu'",
        "<string>:15: daemons.other.idle_ttl_s: expected a positive number of seconds, "
        "got 'forever'",
        "<string>:19: daemons.third.memory.resident: expected a size >= 0, got -1",
        "<string>:19: daemons.third.memory.peak: expected a size in bytes, like 1048576, "
        "\"256MiB\" or \"1.5 GB\", got 1.5",
    ]


def test_pinned_daemon_cannot_have_an_idle_ttl():
    assert errors(MINIMAL + "    pin: true\n    idle_ttl_s: 600\n") == [
        "<string>:6: daemons.espeak.idle_ttl_s: a pinned daemon is never unloaded (pin: true "
        "at line 5), so an idle TTL cannot apply; remove one of the two"]
    # Unpinned, or a TTL of none, is fine.
    assert parse(MINIMAL + "    pin: false\n    idle_ttl_s: 600\n").daemons["espeak"].pin is False
    assert parse(MINIMAL + "    pin: true\n    idle_ttl_s: null\n").daemons["espeak"].pin is True


def test_memory_errors_come_with_the_rest_in_file_order():
    assert errors("""\
        broker:
          liveness: 0
          memory:
            threshold: 90
        daemons:
          espeak:
            engine: a.b:C
            python: "3.12"
            concurrency: 0
            memory: {resident: 1x}
        """) == [
        "<string>:2: broker.liveness: expected a positive integer, got 0",
        "<string>:4: broker.memory.threshold: expected a fraction of the device's memory in "
        "(0, 1] like 0.9, or a size like \"70GiB\", got 90; for 90% write 0.9 or \"90%\"",
        "<string>:9: daemons.espeak.concurrency: expected a positive integer, got 0",
        "<string>:10: daemons.espeak.memory.resident: expected a size in bytes, like 1048576, "
        "\"256MiB\" or \"1.5 GB\", got '1x'",
    ]
