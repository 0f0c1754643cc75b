"""modelhost.gateway: an OpenAI-compatible HTTP gateway in front of the broker.

    modelhost gateway                       # http://127.0.0.1:8000, the embedded default mapping
    modelhost up --config F                 # starts one too when F has a `gateway:` section

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-on-loopback")
    client.audio.speech.create(model="tts-1", voice="alloy", input="Hello")

Its own process: an ASGI app (Starlette on uvicorn) that is a client of the
broker through AsyncClient, never part of the broker's loop; it never
imports the broker. Needs the `gateway` extra (pip install 'modelhost[gateway]').
"""

from ._settings import Route, Settings, default_models

__all__ = ["Settings", "Route", "default_models", "create_app", "serve", "run"]


def create_app(settings, client=None):
    """The ASGI app for `settings` (a Settings, or a spec dict)."""
    from ._app import create_app as create

    if isinstance(settings, dict):
        settings = Settings.from_spec(settings)
    return create(settings, client)


def serve(settings):
    """Run the gateway until SIGINT/SIGTERM (or its parent's exit); returns an exit status."""
    from ._server import serve as run_server

    if isinstance(settings, dict):
        settings = Settings.from_spec(settings)
    return run_server(settings)


run = serve
