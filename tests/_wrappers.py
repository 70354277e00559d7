"""Test helper shared by test_hf_integration and test_trainer."""
import torch


class Wrapper(torch.nn.Module):
    """Stands in for DistributedDataParallel: the model under ``.module``, a forward of its own."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)
