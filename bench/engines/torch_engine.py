"""Bench-only engine: the Part 2 model, loaded once and kept warm."""

from modelhost.daemons.engine import Engine, operation


class TorchEngine(Engine):
    def __init__(self, path, **options):
        super(TorchEngine, self).__init__(**options)
        self.path = path
        self.model = None

    def load(self):
        import torch_model

        self.model = torch_model.load_model(self.path)

    def unload(self):
        self.model = None

    def describe(self):
        import torch

        return {"torch": torch.__version__}

    @operation
    def forward(self, ctx, seed: int):
        import torch_model

        return torch_model.forward_once(self.model, seed)
