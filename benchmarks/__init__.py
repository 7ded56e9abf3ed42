"""Benchmarks of grad_ext against the pure-torch formulations it replaces.

``python benchmarks/run_all.py --out benchmarks/results`` runs the whole suite on the current
device and writes ``results.json``, ``results.md`` and plots to ``<out>/<device-slug>/``.
"""
