"""Benchmarks of ``cohort`` against the plain approach and the machine's limits.

``python -m bench.run`` (``make bench``) runs them; see ``bench/SCALING.md``.
"""
