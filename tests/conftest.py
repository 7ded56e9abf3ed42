"""Shared pytest configuration: the ``cuda`` marker for tests that need a CUDA device."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped when torch.cuda.is_available() is False")
