import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "emulation: runs csrc/cuda on the CPU emulation (scripts/cuda_emulation.sh "
                            "builds it and runs these; skipped without GRAD_EXT_EMULATION_LIBRARY)")
    config.addinivalue_line("markers", "quality: trains with real ImageNet weights and checks the detection "
                            "quality (a few minutes on a CPU; runs in CI like every test)")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("GRAD_EXT_EMULATION_LIBRARY"):
        skip_emulation = pytest.mark.skip(reason="the CUDA emulation runs through scripts/cuda_emulation.sh")
        for item in items:
            if "emulation" in item.keywords:
                item.add_marker(skip_emulation)
    if torch.cuda.is_available():
        return
    # GRAD_EXT_TEST_DEVICE=cpu runs tests/test_cuda*.py on the CPU kernels: a check of the tests
    # themselves where no GPU is at hand (see their docstrings).
    dry_run = os.environ.get("GRAD_EXT_TEST_DEVICE") == "cpu"
    skip = pytest.mark.skip(reason="no CUDA GPU available")
    for item in items:
        if "cuda" in item.keywords and not (dry_run and item.path.name.startswith("test_cuda")):
            item.add_marker(skip)
