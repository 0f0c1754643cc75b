"""TorchEngine: offload, onload and unload of named torch modules.

The CPU tests check the bookkeeping (which device each module came from,
references dropped); the GPU test checks that CUDA memory really comes back.
"""

import gc
import subprocess
import sys
import weakref

import pytest

torch = pytest.importorskip("torch")

from modelhost.daemons.runtime import MemoryMeter, tiers_of  # noqa: E402
from modelhost.daemons.torch_tiers import TorchEngine  # noqa: E402


class Toy(TorchEngine):
    torch_module_attributes = ("model", "table")

    def load(self):
        self.model = torch.nn.Linear(64, 64).to(self.device)
        self.table = torch.arange(16.0, device=self.device)  # a bare tensor: .to() copies


class Movable(object):
    """Stands in for a module on a device this machine lacks; .to() records the move."""

    def __init__(self, device):
        self.device = device

    def to(self, device):
        return Movable(str(device))


class Fake(TorchEngine):
    torch_module_attributes = ("encoder", "decoder", "absent")

    def load(self):
        self.encoder = Movable("cuda:1")
        self.decoder = Movable("cuda:0")


def test_the_runtime_offers_the_offloaded_tier():
    assert tiers_of(Toy()) == ["resident", "offloaded", "unloaded"]


def test_device_option_overrides_the_default():
    assert Toy(device="meta").device == "meta"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Toy().device == expected
    assert Toy(device="cpu").options == {"device": "cpu"}


def test_offload_and_onload_keep_the_weights_on_cpu():
    engine = Toy(device="cpu")
    engine.load()
    weight = engine.model.weight.detach().clone()
    engine.offload()
    assert engine.model.weight.device.type == "cpu" and engine.table.device.type == "cpu"
    assert {name: device.type for name, device in engine._homes.items()} == {
        "model": "cpu", "table": "cpu"}
    engine.onload()
    assert engine._homes == {}
    assert torch.equal(engine.model.weight, weight)
    assert torch.equal(engine.table, torch.arange(16.0))


def test_onload_returns_each_module_to_the_device_it_came_from():
    engine = Fake(device="cuda")
    engine.load()
    engine.offload()
    assert (engine.encoder.device, engine.decoder.device) == ("cpu", "cpu")
    engine.onload()
    assert (engine.encoder.device, engine.decoder.device) == ("cuda:1", "cuda:0")
    assert getattr(engine, "absent", None) is None  # never set: skipped, not an error


def test_unload_drops_the_references():
    engine = Toy(device="cpu")
    engine.load()
    model = weakref.ref(engine.model)
    engine.unload()
    assert engine.model is None and engine.table is None
    gc.collect()
    assert model() is None
    engine.load()  # and it loads again
    assert engine.model is not None


def test_unload_after_offload():
    engine = Toy(device="cpu")
    engine.load()
    engine.offload()
    engine.unload()
    assert engine.model is None and engine._homes == {}


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, modelhost.daemons.torch_tiers, modelhost.daemons.runtime\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_cuda_memory_comes_back_after_offload_and_unload():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    class Big(TorchEngine):
        torch_module_attributes = ("model",)

        def load(self):
            self.model = torch.nn.Linear(4096, 4096).to(self.device)  # 64 MiB of float32

    size = 4096 * 4097 * 4
    engine = Big()
    assert engine.device == "cuda"
    before = torch.cuda.memory_allocated()
    engine.load()
    assert torch.cuda.memory_allocated() >= before + size
    report = MemoryMeter().report()
    assert report["cuda"] >= size and report["cuda_peak"] >= size

    engine.offload()
    assert torch.cuda.memory_allocated() <= before
    assert engine.model.weight.device.type == "cpu"
    engine.onload()
    assert engine.model.weight.device.type == "cuda"
    assert torch.cuda.memory_allocated() >= before + size

    engine.unload()
    assert torch.cuda.memory_allocated() <= before
    assert torch.cuda.memory_reserved() < size  # the cache was emptied
    assert MemoryMeter().report()["cuda"] < size
