"""The ASGI app: OpenAI's audio endpoints over modelhost's AsyncClient.

    POST /v1/audio/speech           text to speech, streamed as the daemon yields chunks
    POST /v1/audio/transcriptions   speech to text (multipart upload)
    GET  /v1/models, /v1/models/ID  the mapped models and the daemons, with their state
    GET  /v1/audio/voices           the voices: OpenAI names as mapped, and each daemon's own
    GET  /health                    {"status": "ok"} (no key needed, says nothing else)

Each HTTP request is one broker call made from this process's event loop;
the broker's loop never sees HTTP. Every wait on the broker (the first chunk,
the next chunk, a transcription's result) is cancelled when the client
disconnects, and with it the call in the daemon.

Its length (about 690 lines): the routes, each with the checks of its OpenAI request
shape and its error mapping; the audio formats (_audio.py), settings (_settings.py)
and server (_server.py) are modules of their own.
"""

import asyncio
import base64
import hmac
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import errors
from .._async_client import AsyncClient
from . import _audio
from ._errors import HTTPError, bad_request, from_modelhost

log = logging.getLogger("modelhost.gateway")

MAX_JSON_BODY = 1 * 2**20  # a speech request is a few KiB of JSON
SPEED_RANGE = (0.25, 4.0)
STREAM_FORMATS = ("audio", "sse")
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
# Multipart overhead allowed beyond max_upload (boundaries, the other fields).
MULTIPART_SLACK = 64 * 1024
VOICES_TIMEOUT_S = 10.0


class _Disconnected(Exception):
    """The HTTP client went away."""


class _TooLarge(Exception):
    pass


async def _unless_gone(receive, work):
    """Run the coroutine `work` (a response's whole exchange with the broker and the
    client) while a second task waits for the client's http.disconnect; a disconnect
    cancels `work` wherever it waits (for a chunk, for a result), which makes
    AsyncClient cancel the call in the daemon, and raises _Disconnected here.

    Two tasks per request, none per chunk: the watch costs nothing per chunk."""
    task = asyncio.ensure_future(work)

    async def wait_gone():
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    gone = asyncio.ensure_future(wait_gone())

    def on_gone(_):
        if not task.done():
            task.cancel()

    gone.add_done_callback(on_gone)
    try:
        return await task
    except asyncio.CancelledError:
        if gone.done() and not gone.cancelled() and gone.exception() is None:
            raise _Disconnected()
        raise  # the server is stopping: its own cancel
    finally:
        gone.remove_done_callback(on_gone)
        gone.cancel()


def _error_response(error):
    headers = dict(error.headers)
    return Response(error.body(), status_code=error.status, media_type="application/json",
                    headers=headers)


async def _send_error(send, error):
    body = error.body()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gateway(object):
    """The app's state: its settings and the one AsyncClient all requests share."""

    def __init__(self, settings, client=None):
        self.settings = settings
        self.client = client  # made in the event loop at startup, unless given
        self._own_client = client is None
        self.app = Starlette(
            routes=[
                Route("/v1/audio/speech", self.speech, methods=["POST"]),
                Route("/v1/audio/transcriptions", self.transcriptions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/audio/voices", self.voices, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPError: self._on_error,
                                StarletteHTTPException: self._on_starlette_error},
            lifespan=self._lifespan)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.settings.api_keys and scope["path"] != "/health":
            problem = self._auth_problem(scope)
            if problem is not None:
                await _send_error(send, problem)
                return
        await self.app(scope, receive, send)

    # --- plumbing -----------------------------------------------------------------

    def _lifespan(self, app):
        gateway = self

        class Lifespan(object):
            async def __aenter__(self):
                if gateway.client is None:
                    gateway.client = AsyncClient(gateway.settings.endpoint,
                                                 curve=gateway.settings.curve or None)

            async def __aexit__(self, *exc_info):
                if gateway._own_client and gateway.client is not None:
                    await gateway.client.aclose()

        return Lifespan()

    def _auth_problem(self, scope):
        header = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if not header:
            return HTTPError(401, "You didn't provide an API key. Send it as `Authorization: "
                             "Bearer KEY` (the keys are in the gateway's configuration).",
                             "invalid_request_error", None, "missing_api_key",
                             {"WWW-Authenticate": "Bearer"})
        scheme, _, key = header.partition(" ")
        key = key.strip().encode()
        # Compared with every key, in constant time each: no early exit to time.
        matched = False
        for candidate in self.settings.api_keys:
            matched |= hmac.compare_digest(key, candidate.encode())
        if scheme.lower() != "bearer" or not matched:
            return HTTPError(401, "Incorrect API key provided.", "invalid_request_error", None,
                             "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return None

    async def _on_error(self, request, exc):
        return _error_response(exc)

    async def _on_starlette_error(self, request, exc):
        message = {404: "Unknown request URL: {} {}. The gateway serves /v1/audio/speech, "
                        "/v1/audio/transcriptions, /v1/audio/voices and /v1/models.",
                   405: "Method {} is not allowed for {}."}.get(exc.status_code)
        text = message.format(request.method, request.url.path) if message else exc.detail
        return _error_response(HTTPError(exc.status_code, text, "invalid_request_error"))

    def _route(self, model, task):
        if not isinstance(model, str) or not model:
            raise bad_request("model is required (one of: {})".format(
                ", ".join(sorted(self._names(task))) or "none"), "model")
        route = self.settings.route(model)
        if route is None:
            raise HTTPError(404, "The model `{}` does not exist here; this gateway serves: {}"
                            .format(model, ", ".join(sorted(self._names(task))) or "none"),
                            "invalid_request_error", "model", "model_not_found")
        if route.task != task:
            raise bad_request("The model `{}` is for {}, not {} (models for {}: {})".format(
                model, route.task, task, task, ", ".join(sorted(self._names(task))) or "none"),
                "model")
        return route

    def _names(self, task):
        return [name for name, route in self.settings.routes.items() if route.task == task]

    async def _json_body(self, request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_JSON_BODY:
            raise HTTPError(413, "the request body has {} bytes; at most {} are accepted".format(
                length, MAX_JSON_BODY), "invalid_request_error", None, "payload_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_JSON_BODY:
                raise HTTPError(413, "the request body is over {} bytes".format(MAX_JSON_BODY),
                                "invalid_request_error", None, "payload_too_large")
        try:
            value = json.loads(bytes(body))
        except ValueError as exc:
            raise bad_request("the request body is not JSON: {}".format(exc))
        if not isinstance(value, dict):
            raise bad_request("the request body must be a JSON object")
        return value

    # --- /v1/audio/speech ---------------------------------------------------------

    async def speech(self, request):
        body = await self._json_body(request)
        route = self._route(body.get("model"), "speech")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("input is required: the text to speak", "input")
        if len(text) > self.settings.max_input_chars:
            raise bad_request("input has {} characters; the maximum is {}".format(
                len(text), self.settings.max_input_chars), "input", "string_above_max_length")
        voice = body.get("voice")
        if isinstance(voice, dict):
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            raise bad_request("voice is required: one of {} or a voice of the daemon (GET "
                              "/v1/audio/voices)".format(", ".join(sorted(route.voices or {}))
                                                         or "the daemon's voices"), "voice")
        response_format = body.get("response_format", "mp3")
        if response_format not in _audio.FORMATS:
            raise bad_request("response_format {!r} is not supported here; use one of {}".format(
                response_format, ", ".join(_audio.FORMATS)), "response_format")
        stream_format = body.get("stream_format", "audio")
        if stream_format not in STREAM_FORMATS:
            raise bad_request("stream_format must be audio or sse, not {!r}".format(
                stream_format), "stream_format")
        speed = body.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) \
                or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            raise bad_request("speed must be a number from {} to {}, not {!r}".format(
                SPEED_RANGE[0], SPEED_RANGE[1], speed), "speed")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise bad_request("instructions must be a string", "instructions")
        missing = _audio.missing_for(response_format, self.settings.pcm_rate)
        if missing:
            raise HTTPError(500, "response_format {} needs {} in the gateway's environment: "
                            "pip install 'modelhost[gateway]'".format(
                                response_format, " and ".join(missing)), "server_error")

        arguments = dict(route.arguments)
        arguments["text"] = text
        arguments["voice"] = route.voice(voice)
        if speed != 1.0:
            if route.speed is None:
                raise bad_request("model `{}` has no speed setting (gateway.models.{}.speed); "
                                  "leave speed at 1.0".format(route.name, route.name), "speed")
            arguments[route.speed.argument] = route.speed.value(float(speed))
        if instructions and route.instructions:
            arguments[route.instructions] = instructions
        return _SpeechResponse(self, route, arguments, response_format, stream_format)

    # --- /v1/audio/transcriptions -------------------------------------------------

    async def transcriptions(self, request):
        limit = self.settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            raise _too_large(int(length), limit)
        received = [0]
        receive = request.receive

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit + MULTIPART_SLACK:
                    raise _TooLarge()
            return message

        counted_request = Request(request.scope, counted)
        try:
            form = await counted_request.form(max_files=1, max_fields=64)
        except _TooLarge:
            raise _too_large(received[0], limit)
        except StarletteHTTPException as exc:
            raise bad_request("the request is not a valid multipart form: {}".format(exc.detail))
        except Exception as exc:  # python-multipart's parse errors
            raise bad_request("the request is not a valid multipart form: {}".format(exc))
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise bad_request("file is required: the audio to transcribe, as a multipart "
                                  "file field", "file")
            data = await upload.read()
            if len(data) > limit:
                raise _too_large(len(data), limit)
            if not data:
                raise bad_request("file is empty", "file")
            route = self._route(form.get("model"), "transcription")
            response_format = form.get("response_format") or "json"
            if response_format not in TRANSCRIPT_FORMATS:
                raise bad_request("response_format {!r} is not supported here; use one of {}"
                                  .format(response_format, ", ".join(TRANSCRIPT_FORMATS)),
                                  "response_format")
            granularities = form.getlist("timestamp_granularities[]") + form.getlist(
                "timestamp_granularities")
            for value in granularities:
                if value not in GRANULARITIES:
                    raise bad_request("timestamp_granularities: {!r} is not word or segment"
                                      .format(value), "timestamp_granularities")
            if form.get("stream") in ("true", "True", "1"):
                raise bad_request("stream is not supported for transcriptions here; leave it "
                                  "out", "stream")
            language = form.get("language") or None
            filename = getattr(upload, "filename", None)
        finally:
            await form.close()
        arguments = dict(route.arguments)
        arguments.update(await _transcription_audio(data, filename))
        if language:
            arguments["language"] = language
        return _TranscriptionResponse(self, route, arguments, response_format,
                                      set(granularities or ["segment"]))

    # --- listings -----------------------------------------------------------------

    async def _daemon_rows(self):
        try:
            status = await self.client.ps(timeout=5.0)
        except errors.ModelhostError as exc:
            raise from_modelhost(exc)
        return {row["name"]: row for row in status.get("daemons") or ()}

    def _model_entries(self, rows):
        created = int(time.time())
        entries = []
        for name, route in self.settings.routes.items():
            row = rows.get(route.daemon) or {}
            entries.append(_model_entry(name, created, route.daemon, route.task, row))
        for name, row in rows.items():
            if name in self.settings.routes:
                continue
            route = self.settings.daemon_routes.get(name)
            entries.append(_model_entry(name, created, name, route.task if route else None, row))
        return entries

    async def models(self, request):
        rows = await self._daemon_rows()
        return _json({"object": "list", "data": self._model_entries(rows)})

    async def model(self, request):
        wanted = request.path_params["model"]
        rows = await self._daemon_rows()
        for entry in self._model_entries(rows):
            if entry["id"] == wanted:
                return _json(entry)
        raise HTTPError(404, "The model `{}` does not exist here".format(wanted),
                        "invalid_request_error", "model", "model_not_found")

    async def voices(self, request):
        wanted = request.query_params.get("model")
        routes = [route for route in self.settings.routes.values() if route.task == "speech"
                  and (wanted is None or wanted in (route.name, route.daemon))]
        if wanted is not None and not routes:
            self._route(wanted, "speech")  # the 404 or 400 that says why
        data = []
        for route in routes:
            for name, voice in sorted((route.voices or {}).items()):
                data.append({"id": name, "object": "audio.voice", "name": name,
                             "model": route.name, "daemon": route.daemon, "voice": voice})
        for daemon in dict.fromkeys(route.daemon for route in routes):
            try:
                own = await self.client.call(daemon, "voices", timeout=VOICES_TIMEOUT_S)
            except errors.ModelhostError as exc:
                log.info("daemon=%s voices: %s", daemon, exc)
                continue
            models = [route.name for route in routes if route.daemon == daemon]
            for voice in _voice_names(own):
                data.append({"id": voice, "object": "audio.voice", "name": voice,
                             "model": None, "models": models, "daemon": daemon, "voice": voice})
        return _json({"object": "list", "data": data})

    async def health(self, request):
        return _json({"status": "ok"})


def _too_large(size, limit):
    return HTTPError(413, "the upload has {} bytes; at most {} are accepted "
                     "(gateway.max_upload)".format(size, limit), "invalid_request_error", "file",
                     "payload_too_large")


def _json(value, status=200):
    return Response(json.dumps(value).encode(), status_code=status,
                    media_type="application/json")


def _model_entry(name, created, daemon, task, row):
    return {"id": name, "object": "model", "created": created, "owned_by": "modelhost",
            "daemon": daemon, "task": task, "state": row.get("state", "unknown"),
            "tier": row.get("tier"), "engine": row.get("engine")}


def _voice_names(value):
    """Voice names from a daemon's `voices`: a list (espeak) or {"registered": [{voice_id}],
    "builtin": [...]} (CosyVoice)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        names = [entry.get("voice_id") for entry in value.get("registered") or ()
                 if isinstance(entry, dict)]
        names += list(value.get("builtin") or ())
        return [str(n) for n in names if n]
    return []


async def _transcription_audio(data, filename):
    """The daemon's audio arguments for an upload: a WAV file as it is, anything else
    decoded here (soundfile: FLAC, Ogg, MP3, ...) to 16-bit mono PCM and its rate."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return {"audio": data}
    try:
        import soundfile  # noqa: F401
    except ImportError:
        return {"audio": data}  # the daemon decides; it reads WAV (and FLAC with soundfile)

    def decode():
        import io

        import numpy
        import soundfile

        samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
        if samples.shape[1] > 1:
            samples = samples.mean(axis=1).astype(numpy.int16)
        return samples.astype("<i2").tobytes(), int(rate)

    try:
        pcm, rate = await asyncio.get_running_loop().run_in_executor(None, decode)
    except Exception as exc:
        raise bad_request("cannot read the audio file {}: {}; send WAV, FLAC, Ogg or MP3"
                          .format(repr(filename) if filename else "", exc), "file")
    return {"audio": pcm, "sample_rate": rate}


class _Pending(object):
    """An ASGI response that first waits on the broker, watching for a disconnect."""

    def __init__(self, gateway, route):
        self.gateway = gateway
        self.route = route
        self.started = time.monotonic()

    def _done(self, status, first_byte=None, note=""):
        log.info("%s model=%s daemon=%s -> %s%s in %.1f ms%s", self.what, self.route.name,
                 self.route.daemon, status, "" if first_byte is None else
                 ", first byte after {:.1f} ms".format(first_byte * 1000),
                 (time.monotonic() - self.started) * 1000, note)


class _SpeechResponse(_Pending):
    what = "speech"

    def __init__(self, gateway, route, arguments, response_format, stream_format):
        super().__init__(gateway, route)
        self.arguments = arguments
        self.format = response_format
        self.sse = stream_format == "sse"

    async def __call__(self, scope, receive, send):
        settings = self.gateway.settings
        chunks = self.gateway.client.stream(
            self.route.daemon, self.route.method,
            timeout=self.route.timeout_s or settings.timeout_s,
            priority=self.route.priority, arguments=self.arguments)
        encoder = _audio.encoder_for(self.format, settings.pcm_rate)
        try:
            await _unless_gone(receive, self._respond(send, chunks, encoder))
        except _Disconnected:
            self._done("client gone", note=": its call was cancelled")
        finally:
            await chunks.aclose()
            if hasattr(encoder, "close"):
                encoder.close()

    async def _next(self, chunks):
        """The next chunk as (pcm, rate, channels), or None at the end."""
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return None
        try:
            return _audio.pcm16_of(chunk)
        except ValueError as exc:
            raise errors.EngineError("daemon {} method {}: {}".format(
                self.route.daemon, self.route.method, exc))

    async def _respond(self, send, chunks, encoder):
        try:
            first = await self._next(chunks)
            if first is None:
                raise errors.EngineError(
                    "daemon {}'s {} streamed no audio; the gateway needs a TTS method that "
                    "yields chunks when streamed".format(self.route.daemon, self.route.method))
        except errors.ModelhostError as exc:
            error = from_modelhost(exc)
            self._done(error.status, note=": [{}] {}".format(exc.code, exc.message))
            await _send_error(send, error)
            return
        pcm, rate, channels = first
        headers = [(b"x-sample-rate", str(self._rate(rate)).encode()),
                   (b"x-channels", str(channels).encode()), (b"cache-control", b"no-store")]
        if not encoder.streams:
            await self._whole(send, chunks, encoder, first, headers)
            return
        media_type = "text/event-stream" if self.sse else _audio.MEDIA_TYPES[self.format]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", media_type.encode())] + headers})
        first_byte = time.monotonic() - self.started
        await self._body(send, encoder.start(rate, channels) + encoder.feed(pcm))
        while True:
            try:
                item = await self._next(chunks)
            except errors.ModelhostError as exc:
                # The status went out with the first chunk: an SSE client gets an error
                # event; an audio client gets a connection cut before the last chunk
                # (returning without ending the body makes the server close it), which
                # every HTTP client reports, rather than a file that just stops.
                self._done(200, first_byte, ": stream failed: [{}] {}".format(
                    exc.code, exc.message))
                if self.sse:
                    error = from_modelhost(exc)
                    await self._event({"type": "error", "error": json.loads(error.body())[
                        "error"]}, send, last=True)
                return
            if item is None:
                break
            if item[1] != rate or item[2] != channels:
                self._done(200, first_byte, ": stream cut: daemon {} changed its audio from {} "
                           "Hz x{} to {} Hz x{} mid-stream".format(
                               self.route.daemon, rate, channels, item[1], item[2]))
                return
            await self._body(send, encoder.feed(item[0]))
        await self._body(send, encoder.finish(), last=True)
        self._done(200, first_byte)

    async def _whole(self, send, chunks, encoder, first, headers):
        """A format that is encoded after the synthesis: every chunk, then one body."""
        pcm, rate, channels = first
        parts = [encoder.start(rate, channels), encoder.feed(pcm)]
        try:
            while True:
                item = await self._next(chunks)
                if item is None:
                    break
                parts.append(encoder.feed(item[0]))
        except errors.ModelhostError as exc:
            error = from_modelhost(exc)
            self._done(error.status, note=": [{}] {}".format(exc.code, exc.message))
            await _send_error(send, error)
            return
        parts.append(encoder.finish())
        data = b"".join(parts)
        if self.sse:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")] + headers})
            await self._body(send, data, last=True)
        else:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", _audio.MEDIA_TYPES[self.format].encode()),
                (b"content-length", str(len(data)).encode())] + headers})
            await send({"type": "http.response.body", "body": data})
        self._done(200, time.monotonic() - self.started)

    def _rate(self, rate):
        if self.format == "pcm" and self.gateway.settings.pcm_rate:
            return self.gateway.settings.pcm_rate
        if self.format == "opus" and rate not in _audio.OPUS_RATES:
            return _audio.OPUS_RATE
        return rate

    async def _body(self, send, data, last=False):
        if self.sse:
            if data:
                await self._event({"type": "speech.audio.delta",
                                   "audio": base64.b64encode(data).decode("ascii")}, send)
            if last:
                # OpenAI's done event carries token usage; nothing is metered here.
                await self._event({"type": "speech.audio.done", "usage": {
                    "input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}, send, last=True)
            return
        if data or last:
            await send({"type": "http.response.body", "body": data, "more_body": not last})

    async def _event(self, event, send, last=False):
        payload = "event: {}\ndata: {}\n\n".format(event["type"], json.dumps(event)).encode()
        await send({"type": "http.response.body", "body": payload, "more_body": not last})


class _TranscriptionResponse(_Pending):
    what = "transcription"

    def __init__(self, gateway, route, arguments, response_format, granularities):
        super().__init__(gateway, route)
        self.arguments = arguments
        self.format = response_format
        self.granularities = granularities

    async def __call__(self, scope, receive, send):
        try:
            result = await _unless_gone(receive, self.gateway.client.call(
                self.route.daemon, self.route.method,
                timeout=self.route.timeout_s or self.gateway.settings.timeout_s,
                priority=self.route.priority, arguments=self.arguments))
        except _Disconnected:
            self._done("client gone", note=": its call was cancelled")
            return
        except errors.ModelhostError as exc:
            error = from_modelhost(exc, "file" if exc.code == errors.BadArguments.code else None)
            self._done(error.status, note=": [{}] {}".format(exc.code, exc.message))
            await _send_error(send, error)
            return
        body, media_type = _transcript(result if isinstance(result, dict) else {}, self.format,
                                       self.granularities)
        await Response(body, media_type=media_type)(scope, receive, send)
        self._done(200)


def _transcript(result, response_format, granularities):
    """(body, media type) of a transcription result in one of OpenAI's formats."""
    text = str(result.get("text") or "")
    duration = float(result.get("duration_s") or 0.0)
    segments = list(result.get("segments") or ())
    usage = {"type": "duration", "seconds": duration}
    if response_format == "text":
        return (text + "\n").encode(), "text/plain; charset=utf-8"
    if response_format in ("srt", "vtt"):
        return _subtitles(segments, response_format).encode(), "text/plain; charset=utf-8"
    if response_format == "json":
        return json.dumps({"text": text, "usage": usage}).encode(), "application/json"
    verbose = {"task": "transcribe", "language": result.get("language") or "",
               "duration": duration, "text": text, "usage": usage}
    if "segment" in granularities:
        # Whisper's per-segment statistics (tokens, logprobs) have no counterpart in
        # every recognizer: neutral values where the daemon gives none.
        verbose["segments"] = [{
            "id": i, "seek": 0, "start": float(s.get("start", 0.0)),
            "end": float(s.get("end", 0.0)), "text": str(s.get("text", "")),
            "tokens": list(s.get("tokens") or ()), "temperature": 0.0,
            "avg_logprob": float(s.get("avg_logprob", 0.0)),
            "compression_ratio": float(s.get("compression_ratio", 0.0)),
            "no_speech_prob": float(s.get("no_speech_prob", 0.0))}
            for i, s in enumerate(segments)]
    if "word" in granularities:
        verbose["words"] = [{"word": str(w.get("word", "")), "start": float(w.get("start", 0.0)),
                             "end": float(w.get("end", 0.0))} for w in result.get("words") or ()]
    return json.dumps(verbose).encode(), "application/json"


def _subtitles(segments, kind):
    def stamp(seconds):
        millis = int(round(max(0.0, float(seconds)) * 1000))
        hours, millis = divmod(millis, 3600000)
        minutes, millis = divmod(millis, 60000)
        secs, millis = divmod(millis, 1000)
        return "{:02d}:{:02d}:{:02d}{}{:03d}".format(hours, minutes, secs,
                                                     "," if kind == "srt" else ".", millis)

    lines = ["WEBVTT", ""] if kind == "vtt" else []
    for i, segment in enumerate(segments, 1):
        if kind == "srt":
            lines.append(str(i))
        lines.append("{} --> {}".format(stamp(segment.get("start", 0.0)),
                                        stamp(segment.get("end", 0.0))))
        lines += [str(segment.get("text", "")).strip(), ""]
    return "\n".join(lines) + ("\n" if lines else "")


def create_app(settings, client=None):
    """The ASGI app for `settings` (a Settings); `client`: an AsyncClient to use instead of
    one made at startup (tests)."""
    return Gateway(settings, client)


__all__ = ["Gateway", "create_app"]
