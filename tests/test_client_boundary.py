"""The client's surface: options keyword-only, one "not set" sentinel, and ZeroMQ and
msgpack failures raised as modelhost errors (from the original exception), against
stand-ins for the broker (no real broker here)."""

import inspect

import pytest

import modelhost
from modelhost import _messages

# What stays positional: what each call is about. Everything else is an option.
POSITIONAL = {
    "__init__": ["endpoint"],
    "call": ["model", "method"], "stream": ["model", "method"], "ps": [], "events": [],
    "load": ["name"], "unload": ["name"], "pin": ["name"], "unpin": ["name"],
    "cancel": ["request_id"],
    "tts": ["text"], "tts_stream": ["text"],
    "register_voice": ["voice_id", "prompt_audio", "prompt_text"],
    "text_to_audio": ["prompt"], "talking_head": ["audio"], "transcribe": ["audio"],
}


def _parameters(function):
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("cls", [modelhost.Client, modelhost.AsyncClient])
def test_options_are_keyword_only(cls):
    for name, positional in POSITIONAL.items():
        if not hasattr(cls, name):
            continue  # events: the blocking client's only
        parameters = _parameters(getattr(cls, name))
        assert [p.name for p in parameters
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == positional, name
        assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
                   for p in parameters if p.name not in positional), name


def test_an_option_passed_by_position_is_refused(tmp_path):
    with pytest.raises(TypeError):
        modelhost.Client("ipc://{}/nobody.sock".format(tmp_path), 5.0)
    with modelhost.Client("ipc://{}/nobody.sock".format(tmp_path)) as client:
        with pytest.raises(TypeError):
            client.call("espeak", "tts", 5.0)
        with pytest.raises(TypeError):
            client.load("tts", 30)


@pytest.mark.parametrize("cls", [modelhost.Client, modelhost.AsyncClient])
def test_one_not_set_sentinel_for_every_option_whose_none_means_something(cls):
    defaults = [p.default for name in POSITIONAL if hasattr(cls, name)
                for p in _parameters(getattr(cls, name))
                if p.default is not inspect.Parameter.empty and p.default is not None
                and not isinstance(p.default, (str, int, float, bool))]
    assert defaults and all(default is _messages.NOT_SET for default in defaults)
    assert repr(_messages.NOT_SET) == "NOT_SET"  # reads as such in help()
