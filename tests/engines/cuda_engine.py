"""A test engine whose weights are a CUDA tensor, with its tiers from TorchEngine.

For the GPU tests only (they skip without CUDA): load() fills `resident_mib`
of device memory, so NVML sees the daemon's pid hold it; offload() moves the
tensor to host RAM and unload() drops it, both through TorchEngine.
"""

import os

from modelhost.daemons.engine import operation
from modelhost.daemons.torch_tiers import TorchEngine

MiB = 2**20


class CudaEngine(TorchEngine):
    torch_module_attributes = ("weights",)

    def __init__(self, resident_mib=256, **options):
        super(CudaEngine, self).__init__(**options)
        self.resident_mib = int(resident_mib)
        self.weights = None

    def load(self):
        import torch

        self.weights = torch.ones(self.resident_mib * MiB, dtype=torch.uint8, device=self.device)

    @operation
    def work(self, ctx, peak_mib: int = 0):
        import torch

        extra = torch.ones(peak_mib * MiB, dtype=torch.uint8, device=self.device) \
            if peak_mib else None
        torch.cuda.synchronize()
        del extra
        return {"pid": os.getpid(), "device": str(self.weights.device)}
