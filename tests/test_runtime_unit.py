"""Unit tests of the daemon runtime's pure parts: check_arguments, operations_of, import_engine,
the tiers an engine offers and the memory meter.

No sockets and no threads: these run in-process against small engines defined here.
"""

import sys
import textwrap
import types

import pytest

from modelhost.daemons.engine import CallContext, Engine, operation, operations_of
from modelhost.daemons.runtime import MemoryMeter, check_arguments, import_engine, tiers_of
from modelhost.errors import BadArguments


class SpeechEngine(Engine):
    @operation
    def tts(self, ctx, text: str, speed: float = 1.0, steps: int = 10, stream: bool = False,
            voice=None, reference: bytes = b"", tags: list = None, extra: dict = None):
        return text

    @operation
    def echo(self, ctx, data=None, **extra):
        return data

    @operation
    def nothing(self, ctx):
        return None

    @operation
    def _hidden(self, ctx):
        """Marked, but private: never callable by clients."""

    def helper(self, ctx, text: str):
        """Not marked: an ordinary method."""

    not_callable = 3


class LoudSpeechEngine(SpeechEngine):
    @operation
    def shout(self, ctx, text: str):
        return text.upper()


ENGINE = SpeechEngine()
OPERATIONS = operations_of(ENGINE)


def check(method, arguments):
    ctx = CallContext(1, method, False, None)
    check_arguments(OPERATIONS[method], ctx, arguments)


def rejected(method, arguments):
    with pytest.raises(BadArguments) as info:
        check(method, arguments)
    assert info.value.code == "bad_arguments"
    return info.value.message


# --- check_arguments: binding ----------------------------------------------------


def test_arguments_that_bind_pass():
    check("tts", {"text": "hello"})
    check("tts", {"text": "hello", "speed": 1.5, "steps": 3, "stream": True})
    check("nothing", {})


def test_missing_argument_is_named():
    message = rejected("tts", {"speed": 2.0})
    assert message.startswith("tts: ")
    assert "missing a required argument: 'text'" in message


def test_unexpected_argument_lists_the_accepted_names():
    message = rejected("tts", {"text": "hi", "pitch": 3})
    assert "unexpected keyword argument 'pitch'" in message
    assert "(accepted arguments: text, speed, steps, stream, voice, reference, tags, " \
           "extra)" in message
    assert "ctx" not in message.split("accepted arguments")[1]


def test_operation_without_arguments_says_it_accepts_none():
    message = rejected("nothing", {"x": 1})
    assert message.endswith("(accepted arguments: none)")


def test_ctx_cannot_be_passed_as_an_argument():
    rejected("tts", {"text": "hi", "ctx": "mine"})


def test_var_keyword_operation_accepts_any_name():
    check("echo", {"data": 1, "anything": b"x", "else": [1, 2]})


@pytest.mark.parametrize("arguments", ["text", ["text"], None, 3])
def test_arguments_must_be_a_map(arguments):
    assert rejected("tts", arguments) == "arguments must be a map of names to values"


# --- check_arguments: annotations -------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("steps", 3),
    ("steps", -2**70),  # a big msgpack int is still an int
    ("speed", 2.5),
    ("speed", 2),  # an int is a fine float
    ("stream", True),
    ("stream", False),
    ("text", ""),
    ("reference", b"\x00"),
    ("tags", ["a"]),
    ("extra", {"k": 1}),
])
def test_values_of_the_annotated_type_pass(name, value):
    arguments = {"text": "hi"}
    arguments[name] = value
    check("tts", arguments)


@pytest.mark.parametrize("name, value, expected, got", [
    ("steps", True, "int", "bool"),  # bool is an int subclass, but not an int here
    ("steps", 2.0, "int", "float"),
    ("steps", "2", "int", "str"),
    ("speed", True, "float", "bool"),  # ... nor a float
    ("speed", "fast", "float", "str"),
    ("stream", 1, "bool", "int"),
    ("stream", "yes", "bool", "str"),
    ("text", b"hi", "str", "bytes"),
    ("text", None, "str", "NoneType"),
    ("reference", "abc", "bytes", "str"),
    ("tags", {"a": 1}, "list", "dict"),
    ("extra", [1], "dict", "list"),
])
def test_values_of_another_type_are_rejected(name, value, expected, got):
    arguments = {"text": "hi"}
    arguments[name] = value
    assert rejected("tts", arguments) == "tts: argument '{}' must be {}, not {}".format(
        name, expected, got)


@pytest.mark.parametrize("value", [None, 3, b"raw", object(), [1], {"k": "v"}])
def test_unannotated_arguments_are_not_checked(value):
    check("tts", {"text": "hi", "voice": value})
    check("echo", {"data": value, "anything": value})


def test_defaults_are_not_checked():
    # `tags: list = None`: the default None is the engine's business, not the caller's.
    check("tts", {"text": "hi"})


def test_other_annotations_are_left_to_the_engine():
    class Typed(Engine):
        @operation
        def run(self, ctx, maybe: "int | None" = None, pair: tuple = (), number: complex = 0j):
            pass

    method = operations_of(Typed())["run"]
    check_arguments(method, CallContext(1, "run", False, None),
                    {"maybe": "not checked", "pair": [1, 2], "number": "nor this"})


def test_postponed_annotations_are_checked_too():
    class Postponed(Engine):
        @operation
        def add(self, ctx, a: "int", b: "int" = 0):  # what PEP 563 turns `a: int` into
            return a + b

    method = operations_of(Postponed())["add"]
    with pytest.raises(BadArguments):
        check_arguments(method, CallContext(1, "add", False, None), {"a": True, "b": "x"})


# --- operations_of --------------------------------------------------------------


def test_operations_of_lists_only_public_marked_methods():
    assert sorted(OPERATIONS) == ["echo", "nothing", "tts"]


def test_operations_are_bound_to_the_engine():
    assert OPERATIONS["tts"](CallContext(1, "tts", False, None), text="hi") == "hi"
    assert OPERATIONS["tts"].__self__ is ENGINE


def test_operations_are_inherited():
    assert sorted(operations_of(LoudSpeechEngine())) == ["echo", "nothing", "shout", "tts"]


def test_engine_base_class_has_no_operations():
    assert operations_of(Engine()) == {}


def test_operation_returns_the_function_itself():
    def speak(self, ctx):
        pass

    assert operation(speak) is speak


# --- import_engine --------------------------------------------------------------


@pytest.fixture
def engine_module(tmp_path, monkeypatch):
    """A module `mh_test_engine_mod` on sys.path with one engine class, forgotten afterwards."""
    (tmp_path / "mh_test_engine_mod.py").write_text(textwrap.dedent("""
        from modelhost.daemons.engine import Engine, operation

        class GoodEngine(Engine):
            @operation
            def ping(self, ctx):
                return "pong"

        NOT_A_CLASS = 3
    """))
    (tmp_path / "mh_test_broken_mod.py").write_text("import mh_test_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mh_test_engine_mod", "mh_test_broken_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield "mh_test_engine_mod"
    for name in ("mh_test_engine_mod", "mh_test_broken_mod"):
        sys.modules.pop(name, None)


def test_import_engine_returns_the_class(engine_module):
    cls = import_engine(engine_module + ":GoodEngine")
    assert cls.__name__ == "GoodEngine"
    assert sorted(operations_of(cls())) == ["ping"]


def test_import_engine_of_a_packaged_engine():
    from modelhost.daemons.engine import Engine as expected

    assert import_engine("modelhost.daemons.engine:Engine") is expected


def test_import_engine_missing_module(engine_module):
    with pytest.raises(ImportError) as info:
        import_engine("mh_test_no_such_module:Engine")
    assert info.value.name == "mh_test_no_such_module"


def test_import_engine_missing_class_names_module_and_class(engine_module):
    with pytest.raises(ImportError, match="module mh_test_engine_mod has no class BadEngine"):
        import_engine(engine_module + ":BadEngine")


def test_import_engine_module_whose_own_import_fails(engine_module):
    with pytest.raises(ImportError) as info:
        import_engine("mh_test_broken_mod:Engine")
    assert info.value.name == "mh_test_not_installed_anywhere"


def test_import_engine_without_a_class_name_is_an_import_error(engine_module):
    # The config rejects such a reference first; the runtime still fails cleanly.
    with pytest.raises(ImportError):
        import_engine(engine_module)


# --- tiers ----------------------------------------------------------------------


class OffloadingEngine(Engine):
    def offload(self):
        pass

    def onload(self):
        pass


class HalfOffloadingEngine(Engine):
    def offload(self):  # no onload(): the weights could never come back
        pass


def test_tiers_of_an_engine():
    assert tiers_of(Engine()) == ["resident", "unloaded"]
    assert tiers_of(OffloadingEngine()) == ["resident", "offloaded", "unloaded"]
    assert tiers_of(HalfOffloadingEngine()) == ["resident", "unloaded"]
    assert tiers_of(None) == ["resident", "unloaded"]  # the engine could not be created


def test_tiers_are_the_class_s_not_the_instance_s():
    engine = Engine()
    engine.offload = engine.onload = lambda: None
    assert tiers_of(engine) == ["resident", "unloaded"]


# --- memory meter ---------------------------------------------------------------

MiB = 2**20


def test_memory_report_of_this_process():
    report = MemoryMeter().report()
    assert set(report) == {"rss", "rss_peak", "cuda", "cuda_peak"}
    assert 0 < report["rss"] <= report["rss_peak"]


def test_reset_peaks_forgets_an_old_high_water_mark():
    meter = MemoryMeter()
    held = bytearray(200 * MiB)
    for offset in range(0, len(held), 4096):
        held[offset] = 1
    del held
    high = meter.call_peaks()["rss_peak"]
    assert high >= meter.rss() + 150 * MiB
    meter.reset_peaks()
    assert meter.call_peaks()["rss_peak"] < high - 150 * MiB


class FakeCuda(object):
    """torch.cuda as the meter uses it: two devices, with reserved bytes and peaks."""

    def __init__(self, initialized=True):
        self.initialized = initialized
        self.resets = []

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def device_count(self):
        return 2

    def memory_reserved(self, index):
        return 100 * (index + 1)

    def max_memory_reserved(self, index):
        return 1000 * (index + 1)

    def reset_peak_memory_stats(self, index):
        self.resets.append(index)


def test_cuda_memory_is_summed_over_devices_once_torch_initialized_cuda(monkeypatch):
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    meter = MemoryMeter()
    report = meter.report()
    assert (report["cuda"], report["cuda_peak"]) == (300, 3000)
    assert meter.call_peaks()["cuda_peak"] == 3000
    meter.reset_peaks()
    assert cuda.resets == [0, 1]


@pytest.mark.parametrize("torch", [None, types.SimpleNamespace(cuda=FakeCuda(initialized=False)),
                                   types.SimpleNamespace()])
def test_no_cuda_figures_without_initialized_cuda(monkeypatch, torch):
    # None: torch not imported (the meter never imports it); no `cuda`: torch mid-import.
    if torch is None:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "torch", torch)
    report = MemoryMeter().report()
    assert report["cuda"] is None and report["cuda_peak"] is None
