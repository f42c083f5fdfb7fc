"""The GPU test layer: every test under tests/gpu is marked ``gpu`` and takes the ``device`` fixture,
which skips the test when no CUDA GPU is present (CI has none, so these never block it).

``FULLVQ_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead: ``benchmarks/gpu_suite.py --smoke`` does,
so that the tests are known to run before a GPU ever runs them ("CUDA against CPU" then compares
the CPU with itself). Run them on a GPU with ``python -m pytest -m gpu tests/gpu``.
"""

import os
from pathlib import Path

import pytest
import torch

ON_CPU = os.environ.get("FULLVQ_GPU_TESTS_ON_CPU") == "1"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (FULLVQ_GPU_TESTS_ON_CPU=1 tries the test on the CPU)")


@pytest.fixture
def cheap_compile(device, monkeypatch):
    """On the CPU stand-in, compile the decoding step with aot_eager (the same graph capture, without
    inductor's minutes of code generation on small CPUs); on a GPU leave the real settings."""
    if device.type == "cpu":
        from fullvq.generator import sampling

        monkeypatch.setattr(sampling, "decode_compile_options", lambda device: {"backend": "aot_eager"})
