"""Running the gateway: the listening socket, uvicorn, the address file, the parent watch."""

import json
import logging
import os
import socket
import sys

from .. import local

log = logging.getLogger("modelhost.gateway")

EXIT_CANNOT_START = 2
GRACEFUL_SHUTDOWN_S = 3


def _listen(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it (Linux): a chunk of audio, or the end of a
    # chunked body, leaves at once instead of waiting out the peer's delayed ACK
    # (40 ms) behind the write before it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def _url(host, port):
    return "http://{}:{}".format("[{}]".format(host) if ":" in host else host, port)


def _write_address(path, host, port):
    """{"url", "host", "port", "pid"} in `path`, replaced atomically: whoever reads it (the
    supervisor, tests) sees the whole of it or nothing."""
    temporary = "{}.{}.tmp".format(path, os.getpid())
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"url": _url(host, port), "host": host, "port": port, "pid": os.getpid()},
                  handle)
    os.replace(temporary, path)


def serve(settings):
    local.configure_logging("gateway", settings.log_level)
    try:
        import uvicorn

        from ._app import create_app
    except ImportError as exc:
        log.error("the gateway needs starlette and uvicorn (%s): pip install "
                  "'modelhost[gateway]'", exc)
        return EXIT_CANNOT_START
    try:
        sock = _listen(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", _url(settings.host, settings.port), exc)
        return EXIT_CANNOT_START
    host, port = sock.getsockname()[:2]
    parent = settings.parent_pid

    class Server(uvicorn.Server):
        async def on_tick(self, counter):
            # Every 0.1 s: a gateway whose `modelhost up` is gone exits, like the daemons.
            if parent and counter % 10 == 0 and os.getppid() != parent:
                log.warning("its parent (pid %d) is gone; exiting", parent)
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            server_header=False)
    server = Server(config)
    if settings.address_file:
        _write_address(settings.address_file, host, port)
    log.info("listening on %s for the broker at %s; models: %s; %s", _url(host, port),
             settings.endpoint or local.default_endpoint(),
             ", ".join("{} -> {}".format(name, route.daemon)
                       for name, route in settings.routes.items()) or "none",
             "API keys required" if settings.api_keys else "no API keys (loopback only)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if settings.address_file:
            try:
                os.unlink(settings.address_file)
            except OSError:
                pass
    log.info("stopped")
    return 0 if server.started else EXIT_CANNOT_START


if __name__ == "__main__":
    sys.exit("run it as `python -m modelhost.gateway --spec FILE` or `modelhost gateway`")
