"""A local OpenAI-compatible test server: streamed chat completions, for the chat loop's tests.

Not a language model: it answers every request with a reply chosen by the
test (`reply`: a string, or a function of the request's messages), cut into
word-sized tokens and streamed as server-sent `chat.completion.chunk` events,
as the OpenAI API and the local servers that copy it (llama.cpp, vLLM) do.

What a test can steer, with no reliance on timing:
- `token_delay`: seconds between tokens (0 by default);
- `hold_after=k`: after k tokens the stream stops and waits until the test
  calls `release()` or the client goes away; `holding` is set meanwhile, so a
  test waits on that event instead of sleeping;
- what it saw: `requests` (each body, and the Authorization header),
  `disconnected` (set when a client dropped a stream before its end),
  `finished` (streams sent to their end).

    with OpenAITestServer(reply="Hello there. How are you?") as server:
        server.url   # http://127.0.0.1:PORT/v1, the base_url for openai.OpenAI
"""

import json
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "test-model"


def tokens_of(text):
    """Word-sized tokens with their leading spaces, punctuation apart: how LLMs stream."""
    return re.findall(r"\s*[\w']+|\s*[^\w\s]|\s+", text)


class OpenAITestServer(object):
    def __init__(self, reply="Hello from the test server.", token_delay=0.0, hold_after=None,
                 model=MODEL):
        self.reply = reply
        self.token_delay = token_delay
        self.hold_after = hold_after
        self.model = model
        self.requests = []  # [{"body": ..., "authorization": ...}]
        self.holding = threading.Event()
        self.disconnected = threading.Event()
        self.finished = 0
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="openai-test",
                                        daemon=True)
        self.url = "http://127.0.0.1:{}/v1".format(self._server.server_address[1])

    def start(self):
        self._thread.start()
        return self

    def release(self):
        """Let a held stream (and any later one) go on past hold_after."""
        self._release.set()

    def hold(self, after):
        """Hold the next streams after `after` tokens again."""
        with self._lock:
            self.hold_after = after
            self._release.clear()
            self.holding.clear()

    def stop(self):
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # --- serving -------------------------------------------------------------------

    def _text_for(self, messages):
        if callable(self.reply):
            return self.reply(messages)
        return self.reply

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [
                        {"id": server.model, "object": "model", "owned_by": "tests"}]})
                else:
                    self._json(404, {"error": {"message": "no such path", "type": "not_found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append({"body": body,
                                            "authorization": self.headers.get("Authorization")})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "no such path", "type": "not_found"}})
                    return
                text = server._text_for(body.get("messages") or [])
                if not body.get("stream"):
                    self._json(200, _completion(body.get("model"), text))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self._stream(body.get("model"), text)
                except (BrokenPipeError, ConnectionResetError):
                    server.disconnected.set()

            def _stream(self, model, text):
                identifier = "chatcmpl-test-{}".format(len(server.requests))
                self._event(_chunk(identifier, model, {"role": "assistant", "content": ""}))
                for index, token in enumerate(tokens_of(text)):
                    if server.hold_after is not None and index == server.hold_after:
                        if not self._hold():
                            server.disconnected.set()
                            return
                    if server.token_delay:
                        time.sleep(server.token_delay)
                    self._event(_chunk(identifier, model, {"content": token}))
                self._event(_chunk(identifier, model, {}, finish_reason="stop"))
                self._send(b"data: [DONE]\n\n")
                self._send(b"")  # the last chunk of the chunked encoding
                with server._lock:
                    server.finished += 1

            def _hold(self):
                """Wait for release(); False when the client closed the connection first."""
                server.holding.set()
                while not server._release.wait(0.02):
                    if self._client_gone():
                        return False
                return True

            def _client_gone(self):
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _event(self, payload):
                self._send(b"data: " + json.dumps(payload).encode() + b"\n\n")

            def _send(self, data):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _json(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that closes a kept-alive connection between requests is no error.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super(_Server, self).handle_error(request, client_address)


def _chunk(identifier, model, delta, finish_reason=None):
    return {"id": identifier, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model or MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _completion(model, text):
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": model or MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(tokens_of(text)),
                      "total_tokens": 1 + len(tokens_of(text))}}
