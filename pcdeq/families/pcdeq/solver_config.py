"""pcDEQ's solver keys: the speed switches of the layer's iterations and implicit backward.

Each switch is measurable on its own (``make bench``); the defaults are the fastest exact path and every
combination gives the same fixed point and gradients (up to the tolerance where noted). On the command line they
are ``solver.<key>`` like the shared keys (the ``solver`` group's schema takes every family's keys); only the
pcDEQ layer reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pcdeq.solver.config import SolverConfig, check_choices
from pcdeq.solver.precision import PRECISIONS

BACKWARDS = ("implicit", "unrolled")
JACOBIANS = ("analytic", "autograd")
WEIGHT_GRADS = ("direct", "autograd")
EVAL_OUTPUTS = ("last", "apply")


@dataclass
class PcdeqSolverConfig(SolverConfig):
    """The shared solver settings (:class:`~pcdeq.solver.config.SolverConfig`) and pcDEQ's switches.

    Attributes:
        backward: "implicit" (the implicit-function gradient, memory independent of the iterations) or
            "unrolled" (backpropagation through every forward iteration: for memory comparisons and gradient
            tests).
        jacobian: J^T u in the implicit backward by the closed form W^T (sigma' * u) ("analytic") or by
            autograd through a tracked application ("autograd", the plain path).
        weight_grad: the gradient of W by one weight-gradient call per solve ("direct") or through the graph of
            a tracked application ("autograd", the plain path).
        precision: "off" (the model's dtype throughout), "mixed" (bfloat16 iterations, then the model's dtype to
            the same tolerance: the same fixed point) or "bf16" (bfloat16 only, approximate); see
            :mod:`pcdeq.solver.precision`. Off by default: CPUs without bfloat16 units run a bfloat16
            convolution slower than a float32 one; on GPUs with bfloat16 units, try mixed.
        inplace: untracked iterations write their sums, activations and residual differences in place.
        compile: torch.compile the untracked iteration step (seconds of compilation per shape).
        eval_output: the layer's output in evaluation (no gradient): the solver's "last" iterate, or "apply" one
            more application to it as training does (they differ by at most one step's change, within the
            tolerance).
        train_output: the layer's output in training with ``weight_grad="direct"``: the solver's "last" iterate
            z*, or "apply" one more application g(z*) (the reference's output, the plain path). Both have the same
            implicit gradient formula (dg(z*)/dtheta = dz*/dtheta at a fixed point); "last" saves one application
            per training step and differs by at most one step's change, within the tolerance (with
            ``precision="bf16"`` the output is always applied in full precision). Opt-in: its gradients differ
            from the reference's by more than the 1e-3 relative we hold the default to (measured in
            ``results/bench/cpu_train_output_last.txt``).
        cache_weight: in evaluation, reuse W = g v / ||v|| while g and v are unchanged.
    """

    backward: str = field(default="implicit", metadata={"choices": BACKWARDS, "example": "implicit"})
    jacobian: str = field(default="analytic", metadata={"choices": JACOBIANS, "example": "analytic"})
    weight_grad: str = field(default="direct", metadata={"choices": WEIGHT_GRADS, "example": "direct"})
    precision: str = field(default="off", metadata={"choices": PRECISIONS, "example": "off"})
    inplace: bool = True
    compile: bool = False
    eval_output: str = field(default="last", metadata={"choices": EVAL_OUTPUTS, "example": "last"})
    train_output: str = field(default="apply", metadata={"choices": EVAL_OUTPUTS, "example": "apply"})
    cache_weight: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self, {"backward": BACKWARDS, "jacobian": JACOBIANS, "weight_grad": WEIGHT_GRADS,
                             "precision": PRECISIONS, "eval_output": EVAL_OUTPUTS, "train_output": EVAL_OUTPUTS})
