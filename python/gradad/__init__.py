"""gradad: the GRAD and Bi-Grid GRAD anomaly detectors built on the grad_ext kernels."""

__version__ = "0.1.0"
