"""Benchmarks: the top layer of the package (it imports the families and the training stack, nothing imports it).

``python -m pcdeq.bench`` (``make bench``) times the paper architectures; see :mod:`pcdeq.bench.cli` for its modes.
The other entry points: ``python -m pcdeq.bench.runs`` (whole runs against the reference's script),
``python -m pcdeq.bench.mondeq_inverse`` (monDEQ's resolvent and W, spatial vs frequency domain),
``python -m pcdeq.bench.gpu_estimate`` (a FLOP model of the tables' GPU time) and
``python -m pcdeq.bench.gpu_check`` (``make gpu-check``: the prepared GPU check).
"""
