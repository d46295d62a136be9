"""Test configuration: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before
fastsd (or fastsd.kernels) is imported by any test module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FASTSD_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402

import fastsd  # noqa: E402
from fastsd import _backend  # noqa: E402

# Backends that can run on this machine's CPU tensors (triton through the interpreter).
CPU_BACKENDS = [b for b in ("triton", "cpp", "torch") if not _backend.reasons("patch_swap", b, torch.empty(0))]


def pytest_report_header(config):
    return [f"fastsd backends runnable on CPU tensors here: {CPU_BACKENDS}",
            f"fastsd._C: {fastsd._ext.load_error() or 'loaded'}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
