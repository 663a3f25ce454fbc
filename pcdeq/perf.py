"""The performance switches at their plain values: one list for the benchmark, the tests and the accuracy check.

The defaults of the solver settings (the shared keys and the families' own), of the pcDEQ model options and of the
optimiser are the fastest exact path. ``PLAIN`` turns every optimisation off: autograd vector-Jacobian products and
weight gradients through a tracked application, a residual check after every iteration, out-of-place iterations, no
cached W, the first iteration's product computed from z = 0, one more application as the evaluation and training
output, float32 throughout, contiguous (NCHW) convolutions, torch's per-tensor optimiser loop, and for monDEQ W
applied as spatial convolutions instead of in the frequency domain. The plain path is what the reference
implementation does, so ``make bench`` reports each switch's effect against it, and ``python -m pcdeq.bench.switches``
trains both ways to show the accuracy does not move.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pcdeq.solver.config import Settings

PLAIN: dict[str, str | bool] = {
    "solver.jacobian": "autograd",
    "solver.weight_grad": "autograd",
    "solver.check": "every",
    "solver.inplace": False,
    "solver.cache_weight": False,
    "solver.skip_zero_product": False,
    "solver.eval_output": "apply",
    "solver.train_output": "apply",
    "solver.precision": "off",
    "solver.compile": False,
    "solver.mondeq_w": "spatial",
    "model.channels_last": False,
    "optim.fused": False,
}


def plain_overrides() -> list[str]:
    """``PLAIN`` as command-line overrides for train.py (e.g. ``solver.check=every``)."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in PLAIN.items()]


def plain_solver(solver: Settings) -> Settings:
    """``solver`` with every solver switch it has (its family's and the shared ones) at its plain value."""
    own = {f.name for f in dataclasses.fields(solver)}
    keys: dict[str, Any] = {k.split(".", 1)[1]: v for k, v in PLAIN.items() if k.startswith("solver.")}
    return dataclasses.replace(solver, **{k: v for k, v in keys.items() if k in own})


def plain_model_options() -> dict[str, str | bool]:
    """The pcDEQ model options at their plain values (keyword arguments of :func:`pcdeq.build_model`)."""
    return {k.split(".", 1)[1]: v for k, v in PLAIN.items() if k.startswith("model.")}
