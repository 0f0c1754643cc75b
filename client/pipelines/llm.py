"""The chat loop's language model: an OpenAI-compatible chat-completions endpoint, streamed.

Any server that speaks the OpenAI chat-completions API works: the hosted API
(`url: https://api.openai.com/v1`), or a local one (llama.cpp's
`llama-server`, vLLM, Ollama's `/v1`, LM Studio...). The reply streams token
by token (`stream=True`), through the `openai` package's asyncio client, so
that cancelling the task that reads it closes the HTTP stream at once.

Without a URL there is no language model: `EchoReply` answers by a fixed
rule ("You said: ..."), streamed word by word, so the rest of the loop
(sentences, speech, video, interruption) still runs.

The API key is read from the environment variable the configuration names
(`api_key_env`, default OPENAI_API_KEY), never from the file itself. A local
server needs none.
"""

import asyncio
import dataclasses
import os
import re
from typing import Optional

DEFAULT_SYSTEM = ("You are a friendly voice assistant. Your replies are spoken aloud: "
                  "answer in a few short sentences of plain text, without lists, markdown "
                  "or emoji.")
ECHO_RULE = "You said: {text}"


class LLMError(Exception):
    """The language model could not answer; the message says what to check."""


@dataclasses.dataclass
class LLMConfig:
    # Base URL of an OpenAI-compatible API, up to /v1 (None: no model, echo replies).
    url: Optional[str] = None
    # The model name the server serves; None asks the server (/v1/models) for its first.
    model: Optional[str] = None
    # The environment variable holding the API key (a local server needs none).
    api_key_env: str = "OPENAI_API_KEY"
    system: str = DEFAULT_SYSTEM
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    # Further fields of the request body, as the server documents them (top_p, stop, ...).
    options: dict = dataclasses.field(default_factory=dict)
    timeout_s: float = 60.0
    # Retries of a request that failed to connect (the openai package's own).
    max_retries: int = 1


def make_reply_source(config):
    """The reply source for a configuration: OpenAIReply with a URL, else EchoReply."""
    if config.url:
        return OpenAIReply(config)
    return EchoReply()


class EchoReply(object):
    """No language model: reply by a fixed rule, streamed a word at a time."""

    description = "no language model configured: replies echo what was said"
    model = None

    def __init__(self, rule=ECHO_RULE):
        self.rule = rule

    async def stream(self, messages):
        said = ""
        for message in reversed(messages):
            if message.get("role") == "user":
                said = message.get("content") or ""
                break
        text = self.rule.format(text=said.strip() or "nothing")
        for token in re.findall(r"\s*\S+", text):
            await asyncio.sleep(0)  # a point where a cancel lands, as between real tokens
            yield token

    async def aclose(self):
        pass


class OpenAIReply(object):
    """Streamed replies from an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, config):
        try:
            import openai
        except ImportError:
            raise LLMError("the chat's language model needs the openai package: pip install "
                           "openai (or 'modelhost[pipelines]')")
        self._openai = openai
        self.config = config
        self.model = config.model
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        self.has_key = bool(key)
        self.description = "language model at {}".format(config.url)
        self._client = openai.AsyncOpenAI(base_url=config.url, api_key=key or "not-needed",
                                          timeout=config.timeout_s,
                                          max_retries=config.max_retries)

    async def resolve_model(self):
        """The model to ask for: the configured one, else the first the server lists."""
        if self.model:
            return self.model
        try:
            listed = await self._client.models.list()
        except self._openai.OpenAIError as exc:
            raise self._error(exc, "listing its models (set llm.model / --llm-model to skip "
                                   "this)")
        names = [model.id for model in getattr(listed, "data", None) or []]
        if not names:
            raise LLMError("the language model at {} lists no models; set llm.model "
                           "(--llm-model)".format(self.config.url))
        self.model = names[0]
        return self.model

    async def stream(self, messages):
        """Async-iterate the reply's text as it streams."""
        model = await self.resolve_model()
        body = dict(self.config.options)
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        known = {"temperature", "max_tokens", "top_p", "stop", "seed", "presence_penalty",
                 "frequency_penalty"}
        extra = {key: body.pop(key) for key in list(body) if key not in known}
        try:
            stream = await self._client.chat.completions.create(
                model=model, messages=messages, stream=True,
                extra_body=extra or None, **body)
        except self._openai.OpenAIError as exc:
            raise self._error(exc, "starting the reply")
        try:
            async for chunk in stream:
                for choice in getattr(chunk, "choices", None) or []:
                    delta = getattr(choice, "delta", None)
                    text = getattr(delta, "content", None) if delta is not None else None
                    if text:
                        yield text
        except self._openai.OpenAIError as exc:
            raise self._error(exc, "streaming the reply")
        finally:
            # Closing the response closes the HTTP stream: a cancelled reply stops
            # costing tokens on the server.
            await stream.close()

    async def aclose(self):
        await self._client.close()

    def _error(self, exc, doing):
        openai = self._openai
        where = "the language model at {}".format(self.config.url)
        if isinstance(exc, openai.AuthenticationError):
            hint = ("; set ${} to its API key".format(self.config.api_key_env)
                    if not self.has_key else "; the key in ${} was refused".format(
                        self.config.api_key_env))
            return LLMError("{} refused the request while {} ({}){}".format(
                where, doing, _short(exc), hint))
        if isinstance(exc, openai.APIConnectionError):
            return LLMError("{} did not answer while {}: {}; is the server running, and is the "
                            "URL right (it ends in /v1)?".format(where, doing, _short(exc)))
        if isinstance(exc, openai.APIStatusError):
            return LLMError("{} answered HTTP {} while {}: {}".format(
                where, exc.status_code, doing, _short(exc)))
        return LLMError("{} failed while {}: {}".format(where, doing, _short(exc)))


def _short(exc, limit=300):
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
