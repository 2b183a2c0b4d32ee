import importlib.util
import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The variable is read when
# the kernels are defined, so it must be set before anything imports fastmax_hf.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 (0 when both are 0)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


@pytest.fixture
def gen():
    """A fresh random generator per test, seeded from the global RNG so runs differ."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    return g


def randn(gen, *shape, dtype=torch.float64, requires_grad=False):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return x.requires_grad_(requires_grad)


def load_script(path: Path, name: str):
    """A script of scripts/ imported as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
