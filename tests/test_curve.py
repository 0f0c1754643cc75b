"""Security over tcp: CURVE keys from `modelhost keys`, a broker that lets in only the
authorized ones, and a configuration that refuses tcp beyond loopback without them."""

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq.auth

import modelhost
from modelhost import cli
from modelhost._curve import client_keys
from modelhost.broker.config import ConfigError, daemon_spec, parse_config

from conftest import daemon_yaml


def make_keys(directory, name):
    assert cli.main(["keys", "--dir", str(directory), name]) == 0
    return directory / (name + ".key"), directory / (name + ".key_secret")


def free_port(address):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def non_loopback_address():
    """An IPv4 address of this machine beyond loopback that can be bound, or None."""
    candidates = []
    try:
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                                     timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                                 socket.AF_INET)]
    except OSError:
        pass
    for address in candidates:
        if ":" in address or address.startswith("127."):
            continue
        try:
            free_port(address)
        except OSError:
            continue
        return address
    return None


class Keys(object):
    def __init__(self, root):
        self.dir = root / "keys"
        self.authorized = root / "authorized"
        self.authorized.mkdir()
        self.broker_public, self.broker_secret = make_keys(self.dir, "broker")
        self.alice_public, self.alice_secret = make_keys(self.dir, "alice")
        self.mallory_public, self.mallory_secret = make_keys(self.dir, "mallory")
        shutil.copy(str(self.alice_public), str(self.authorized))

    def curve(self, who):
        return {"server_key": str(self.broker_public),
                "client_key": str(getattr(self, who + "_secret"))}

    def public_z85(self, who):
        return zmq.auth.load_certificate(str(getattr(self, who + "_public")))[0].decode()


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path)


@pytest.fixture
def curve_host(make_host, keys, monkeypatch, test_venvs):
    """A real `modelhost up` with CURVE on all three sockets: the frontend on an address
    beyond loopback where this machine has one, backend and events on loopback tcp; one
    daemon on the host's interpreter, one on Python 3.7 in its own venv."""
    address = non_loopback_address() or "127.0.0.1"
    frontend = "tcp://{}:{}".format(address, free_port(address))
    settings = {
        "frontend": frontend,
        "backend": "tcp://127.0.0.1:{}".format(free_port("127.0.0.1")),
        "events": "tcp://127.0.0.1:{}".format(free_port("127.0.0.1")),
        "curve": "{{secret_key: {}, authorized_keys: {}}}".format(keys.broker_secret,
                                                                keys.authorized),
    }
    # The host helper's own ps() goes through the environment, as the CLI's does.
    monkeypatch.setenv("MODELHOST_CURVE_SERVER_KEY", str(keys.broker_public))
    monkeypatch.setenv("MODELHOST_CURVE_CLIENT_KEY", str(keys.alice_secret))
    host = make_host([daemon_yaml("probe"), daemon_yaml("old", test_venvs["py37"])], settings)
    host.endpoint = frontend
    host.start()
    # Ready means the daemons connected their control and slot sockets over CURVE.
    host.wait_ready("probe", "old")
    return host


@pytest.mark.slow
def test_an_authorized_key_gets_service(curve_host, keys):
    with modelhost.Client(curve_host.endpoint, curve=keys.curve("alice"), timeout=10) as client:
        status = client.ps(timeout=5)
        assert [d["name"] for d in status["daemons"]] == ["probe", "old"]
        assert client.call("probe", "add", a=2, b=3) == 5
        assert client.call("old", "info")["python"].startswith("3.7")
        # Over the CURVE events socket, which connects asynchronously: retry until an
        # event gets through.
        for _ in range(5):
            events = client.events(kinds=["request"], timeout=2)
            client.call("probe", "add", a=1)
            event = next(events, None)
            events.close()
            if event is not None:
                break
        assert event["kind"] == "request" and event["daemon"] == "probe"

    async def main():
        async with modelhost.AsyncClient(curve_host.endpoint, curve=keys.curve("alice"),
                                         timeout=10) as client:
            await client.ps(timeout=5)
            return await client.call("probe", "add", a=4, b=5)

    assert asyncio.run(main()) == 9

    # On the broker's host, `--config` connects as the broker itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHOST_CURVE_")}
    ps = subprocess.run([sys.executable, "-m", "modelhost.cli", "ps", "--config",
                         str(curve_host.config)], capture_output=True, text=True, env=env,
                        timeout=60)
    assert ps.returncode == 0 and "probe" in ps.stdout, ps.stderr


@pytest.mark.slow
def test_an_unknown_key_is_refused_until_authorized(curve_host, keys):
    # Refusals end the wait as soon as the handshake says so: the timeouts are
    # only there so that a broken refusal fails the test instead of hanging it.
    started = time.monotonic()
    with modelhost.Client(curve_host.endpoint, curve=keys.curve("mallory"),
                          broker_timeout=10.0) as client:
        with pytest.raises(modelhost.BrokerUnavailable, match="refused this client's CURVE key"):
            client.ps(timeout=10)
        with pytest.raises(modelhost.BrokerUnavailable, match="refused this client's CURVE key"):
            client.call("probe", "add", a=1, timeout=10)

    async def refused():
        async with modelhost.AsyncClient(curve_host.endpoint, curve=keys.curve("mallory"),
                                         broker_timeout=10.0) as client:
            with pytest.raises(modelhost.BrokerUnavailable, match="refused this client's"):
                await client.ps(timeout=10)
            with pytest.raises(modelhost.BrokerUnavailable, match="refused this client's"):
                await client.call("probe", "add", a=1, timeout=10)

    asyncio.run(refused())
    # Each of the four waits above would take its whole 10 s timeout if the refusal
    # did not end it.
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while keys.public_z85("mallory") not in curve_host.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    refusals = [line for line in curve_host.log().splitlines() if "refused a client" in line]
    assert refusals and keys.public_z85("mallory") in refusals[0], curve_host.log()[-3000:]
    assert str(keys.authorized) in refusals[0]

    # No keys at all: the broker wants CURVE, and the client says so.
    with modelhost.Client(curve_host.endpoint, curve=False, broker_timeout=10.0) as client:
        with pytest.raises(modelhost.BrokerUnavailable, match="wants CURVE authentication"):
            client.ps(timeout=10)

    # The directory is read again at the next handshake: no restart needed.
    shutil.copy(str(keys.mallory_public), str(keys.authorized))
    with modelhost.Client(curve_host.endpoint, curve=keys.curve("mallory")) as client:
        assert client.ps(timeout=5)["daemons"][0]["name"] == "probe"
    assert "authorized keys: 2 in" in curve_host.log()


# --- the configuration ----------------------------------------------------------------

def config_errors(text, path=None):
    with pytest.raises(ConfigError) as info:
        parse_config(text, path)
    return info.value.errors


DAEMONS = "daemons:\n  espeak:\n    engine: a.b:C\n    python: \"3.12\"\n"


def test_non_loopback_tcp_needs_curve():
    (message,) = config_errors("broker:\n  log_level: info\n  frontend: tcp://0.0.0.0:5555\n"
                               + DAEMONS)
    assert message.startswith("<string>:3: broker.frontend: 'tcp://0.0.0.0:5555' is not on "
                              "loopback: non-loopback tcp needs CURVE authentication")
    assert "set broker.curve (secret_key, authorized_keys: see `modelhost keys`)" in message


def test_curve_allows_tcp_beyond_loopback(keys, tmp_path):
    config = parse_config(textwrap.dedent("""\
        broker:
          runtime_dir: {run}
          frontend: tcp://0.0.0.0:5555
          backend: tcp://127.0.0.1:5556
          curve:
            secret_key: keys/broker.key_secret
            authorized_keys: authorized
        """).format(run=tmp_path / "run") + DAEMONS, tmp_path / "config.yaml")
    curve = config.broker.curve
    assert (curve.secret_key, curve.authorized_keys) == (keys.broker_secret, keys.authorized)
    # Daemons of this host connect to a CURVE backend as the broker itself.
    assert daemon_spec(config, "espeak")["curve"] == {"server_key": str(keys.broker_secret),
                                                      "client_key": str(keys.broker_secret)}
    plain = parse_config("broker:\n  backend: tcp://127.0.0.1:5556\n" + DAEMONS)
    assert "curve" not in daemon_spec(plain, "espeak")


def test_bad_curve_settings(keys, tmp_path):
    os.chmod(str(keys.alice_secret), 0o640)
    errors = config_errors(textwrap.dedent("""\
        broker:
          frontend: tcp://0.0.0.0:5555
          curve:
            secret_key: {public}
            authorized_keys: {missing}
        """).format(public=keys.broker_public, missing=tmp_path / "nowhere") + DAEMONS)
    assert errors == [
        "<string>:4: broker.curve.secret_key: {} holds only a public key; use the "
        "NAME.key_secret beside it".format(keys.broker_public),
        "<string>:5: broker.curve.authorized_keys: {} is not a directory; create it and copy "
        "there the public NAME.key of each client to let in".format(tmp_path / "nowhere"),
    ]
    (message,) = config_errors("broker:\n  curve:\n    secret_key: {}\n    authorized_keys: {}\n"
                               .format(keys.alice_secret, keys.authorized) + DAEMONS)
    assert message == ("<string>:3: broker.curve.secret_key: {0} is open to group or others "
                       "(mode 0640); a secret key must be owner-only: chmod 600 {0}"
                       .format(keys.alice_secret))
    (message,) = config_errors("broker:\n  frontend: tcp://10.0.0.1:5555\n  curve:\n"
                               "    authorized_keys: {}\n".format(keys.authorized) + DAEMONS)
    assert message.startswith("<string>:4: broker.curve.secret_key: required key is missing")


# --- keys -------------------------------------------------------------------------------

def test_keys_writes_an_owner_only_secret(tmp_path, capsys):
    directory = tmp_path / "k"
    public, secret = make_keys(directory, "alice")
    out = capsys.readouterr().out
    assert str(public) in out and str(secret) in out and "MODELHOST_CURVE_CLIENT_KEY" in out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert sec is not None and zmq.auth.load_certificate(str(public)) == (pub, None)

    # An existing pair is kept unless --force.
    assert cli.main(["keys", "--dir", str(directory), "alice"]) == cli.EXIT_ERROR
    assert "already exist" in capsys.readouterr().err
    assert zmq.auth.load_certificate(str(secret))[0] == pub
    assert cli.main(["keys", "--dir", str(directory), "--force", "alice"]) == 0
    assert zmq.auth.load_certificate(str(secret))[0] != pub
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert cli.main(["keys", "--dir", str(directory), "../x"]) == cli.EXIT_USAGE


def test_keys_default_to_the_state_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODELHOST_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["keys"]) == 0
    assert (tmp_path / "state" / "keys" / "broker.key_secret").is_file()


def test_client_keys_name_what_is_missing(keys, monkeypatch):
    monkeypatch.delenv("MODELHOST_CURVE_SERVER_KEY", raising=False)
    monkeypatch.delenv("MODELHOST_CURVE_CLIENT_KEY", raising=False)
    assert client_keys() is None
    monkeypatch.setenv("MODELHOST_CURVE_SERVER_KEY", str(keys.broker_public))
    with pytest.raises(ValueError, match="MODELHOST_CURVE_CLIENT_KEY is not set"):
        client_keys()
    monkeypatch.setenv("MODELHOST_CURVE_CLIENT_KEY", str(keys.alice_public))
    with pytest.raises(ValueError, match="holds only a public key"):
        client_keys()
    assert client_keys(False) is None
    with pytest.raises(OSError, match="cannot read"):
        client_keys({"server_key": "/nonexistent.key", "client_key": str(keys.alice_secret)})
    pair = client_keys(keys.curve("alice"))
    assert pair.client_public.decode() == keys.public_z85("alice")
    # Keys are for tcp only: an ipc endpoint is unaffected by them.
    with modelhost.Client("ipc:///nonexistent/frontend.sock", curve=keys.curve("alice")) as client:
        assert client._handshake is None
