"""The model shared by bench/overhead.py Part 2: the subprocess baseline and the warm daemon.

About 0.5 GB of float32 weights: a small first layer (the one the forward runs
through, so a warm call costs what a request costs, not a big matmul) and eight
4096x4096 layers that stand for the rest of a real model's weights.
"""

import torch
from torch import nn

FIRST_DIM = 1024
BIG_DIM = 4096
BIG_LAYERS = 8


class BenchModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(FIRST_DIM, FIRST_DIM)
        self.rest = nn.ModuleList(nn.Linear(BIG_DIM, BIG_DIM) for _ in range(BIG_LAYERS))

    def forward(self, x):
        # Only the first layer: the call itself stays small and cheap.
        return self.first(x)


def build_state_dict(path):
    """Write a random state dict for BenchModel to `path`; returns its size in bytes."""
    torch.manual_seed(0)
    model = BenchModel()
    torch.save(model.state_dict(), path)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def load_model(path):
    """What a `python model.py` script does first: build the module, load the weights.

    One intra-op thread, on both sides of the comparison: a 1x1024 matvec gains
    nothing from a second thread, and on a busy 2-core machine OpenMP's barrier
    waiting for that thread costs milliseconds per forward (measured: 0.2 ms
    with one thread, 4 ms with two while another process held a core).
    """
    torch.set_num_threads(1)
    model = BenchModel()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model


def forward_once(model, seed):
    """One small request: a 1x1024 input through the first layer; a float to print."""
    # Again here, not only in load_model: with OpenMP the setting holds for the
    # calling thread only, and a daemon runs load() and its operations on
    # different threads (without this a warm forward took 4-5 ms, not 0.3 ms).
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.randn(1, FIRST_DIM, generator=generator)
    with torch.no_grad():
        return float(model(x).sum())
