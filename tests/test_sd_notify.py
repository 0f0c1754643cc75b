"""sd_notify against a real unix datagram socket, as systemd gives it in $NOTIFY_SOCKET."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from modelhost.broker.sd_notify import Notifier


@pytest.fixture
def listener(tmp_path):
    """A datagram socket where systemd would listen; yields (path, receive)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)

    def receive(timeout=10.0):
        sock.settimeout(timeout)
        data = sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    yield path, receive
    sock.close()


def test_ready_status_stopping_and_watchdog_reach_the_socket(listener):
    path, receive = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.enabled and notifier.watchdog_s == 1.0
    assert notifier.ready("serving 3 daemons")
    assert receive() == {"READY": "1", "STATUS": "serving 3 daemons"}
    assert notifier.watchdog()
    assert receive() == {"WATCHDOG": "1"}
    assert notifier.stopping()
    assert receive() == {"STOPPING": "1", "STATUS": "stopping"}
    notifier.close()


def test_the_abstract_namespace_is_understood():
    name = "modelhost-test-{}".format(os.getpid())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    finally:
        sock.close()


def test_without_systemd_it_does_nothing():
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.ready("up") is False


def test_a_watchdog_meant_for_another_process_is_not_fed():
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_s is None


def test_a_gone_socket_is_a_warning_not_a_crash(tmp_path):
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("up") is False


@pytest.mark.slow
def test_the_broker_says_ready_feeds_the_watchdog_and_says_stopping(listener, tmp_path):
    path, receive = listener
    runtime = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text("broker:\n  runtime_dir: {}\n  state_dir: {}\ndaemons: {{}}\n".format(
        runtime, tmp_path / "state"))
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    broker = subprocess.Popen([sys.executable, "-m", "modelhost.broker", "--config",
                               str(config)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        ready = receive()
        assert ready["READY"] == "1" and "clients at ipc://" in ready["STATUS"]
        assert os.path.exists(str(runtime / "frontend.sock"))  # bound before READY
        started = time.monotonic()
        pings = [receive(timeout=2.0) for _ in range(3)]
        assert pings == [{"WATCHDOG": "1"}] * 3
        assert time.monotonic() - started < 2.0  # every 0.2 s, half of WATCHDOG_USEC
        broker.send_signal(signal.SIGTERM)
        message = receive()
        while message == {"WATCHDOG": "1"}:
            message = receive()
        assert message == {"STOPPING": "1", "STATUS": "stopping"}
        assert broker.wait(10) == 0
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
