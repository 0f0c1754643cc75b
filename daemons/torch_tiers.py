"""TorchEngine: the memory tiers for an engine whose weights are torch modules.

An engine author names the attributes that hold the weights, and writes
load() to fill them on `self.device`; offload(), onload() and unload() come
for free:

    class TTS(TorchEngine):
        torch_module_attributes = ("model", "vocoder")

        def load(self):
            self.model = build_model().to(self.device).eval()
            self.vocoder = build_vocoder().to(self.device)

- offload(): each named attribute to the CPU (host RAM), remembering the
  device it was on; the CUDA cache is emptied so the device memory is free;
- onload():  each back to the device it came from;
- unload():  each attribute set to None; garbage collected, CUDA cache emptied.

Attributes name objects with `.to(device)`: torch.nn.Module (moved in place)
or tensors (`.to` returns a copy, so the attribute is reassigned either way).
Anything else that holds device memory (a KV cache, CUDA graphs) is the
engine's to drop: override the hooks and call super().

Named attributes, rather than a method that returns modules, because unload()
must drop the engine's own references, and an attribute name is what it
can set to None.

`self.device` is the "device" option if given, else "cuda" when
torch.cuda.is_available(), else "cpu". Host copies are ordinary (not pinned)
memory: pinning would make onload faster but holds page-locked RAM, which a
crowded host can ill afford.

torch is imported when a hook first needs it, never at import of this module,
so the runtime can list this engine's tiers without paying for torch.
"""

import gc

from .engine import Engine


def _torch():
    import torch  # an engine based on this class has torch in its venv
    return torch


def _release_cuda_cache(torch):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _device_of(obj):
    """Where a module's (or tensor's) weights are; None when it has none."""
    device = getattr(obj, "device", None)  # tensors, and many wrapped models
    if device is not None:
        return device
    for getter in ("parameters", "buffers"):
        for tensor in getattr(obj, getter, lambda: ())():
            return tensor.device
    return None


class TorchEngine(Engine):
    """An Engine whose `torch_module_attributes` move between device, host RAM and nothing."""

    torch_module_attributes = ()

    def __init__(self, **options):
        super(TorchEngine, self).__init__(**options)
        self._device = options.get("device")
        # attribute -> the device it was on before offload(), for onload().
        self._homes = {}

    @property
    def device(self):
        if self._device is None:
            self._device = "cuda" if _torch().cuda.is_available() else "cpu"
        return self._device

    def _modules(self):
        for name in self.torch_module_attributes:
            module = getattr(self, name, None)
            if module is not None:
                yield name, module

    def offload(self):
        for name, module in list(self._modules()):
            self._homes[name] = _device_of(module) or self.device
            setattr(self, name, module.to("cpu"))
        _release_cuda_cache(_torch())

    def onload(self):
        for name, module in list(self._modules()):
            setattr(self, name, module.to(self._homes.pop(name, self.device)))

    def unload(self):
        for name in self.torch_module_attributes:
            setattr(self, name, None)
        self._homes.clear()
        gc.collect()  # modules often sit in reference cycles (hooks, closures)
        _release_cuda_cache(_torch())
