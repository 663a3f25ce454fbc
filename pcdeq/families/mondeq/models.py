"""monDEQ models (fully connected, single conv, multi-tier) and their builder.

Sizes follow Winston & Kolter (2020); parameter counts (checked in tests/test_mondeq.py):

============  =========================  ===========  ===========================
dataset       fc (units)                 conv (ch)    multitier (channels)
============  =========================  ===========  ===========================
mnist         87 -> 84,313               54 -> 79,500  (16, 32, 32) -> 81,394
svhn/cifar10  87 (not in the paper)      81 -> 172,218 (16, 32, 60) -> 170,194
cifar10_aug   87 (not in the paper)      200 -> 853,612 (64, 128, 128) -> 1,014,546
digits        32                         16            (8, 16, 16)
============  =========================  ===========  ===========================

The digits sizes (8x8 images, padded grid 10, tier grids 10/6/4) are our choice: small enough to train in
seconds on a CPU, with the same structure as the paper's models.

Heads: fc -> Linear(width, classes); conv -> AvgPool(4) on the padded map (34 -> 8, 30 -> 7, 10 -> 2) ->
Linear; multitier -> flatten the last tier (border included) -> Linear.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pcdeq.dataset_specs import get_spec
from pcdeq.errors import ConfigError
from pcdeq.family import Family, register_family
from pcdeq.solver import get_solver
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import SolverStats, collect_stats, residual_histories

from .operators import ConvTiersMonotone, DenseMonotone
from .solver_config import MondeqSolverConfig
from .splitting import ImplicitBackwardSpec, SplittingProblem, implicit_backward, tune_alpha

Tensor = torch.Tensor

ARCHS = ("fc", "conv", "multitier")

# The authors' sizes (fc on svhn/cifar10/cifar10_aug and every digits size are ours).
PAPER_SIZES: dict[str, dict[str, int | tuple[int, ...]]] = {
    "fc": {"digits": 32, "mnist": 87, "svhn": 87, "cifar10": 87, "cifar10_aug": 87},
    "conv": {"digits": 16, "mnist": 54, "svhn": 81, "cifar10": 81, "cifar10_aug": 200},
    "multitier": {
        "digits": (8, 16, 16),
        "mnist": (16, 32, 32),
        "svhn": (16, 32, 60),
        "cifar10": (16, 32, 60),
        "cifar10_aug": (64, 128, 128),
    },
}

TUNE_AT_BATCH = 30  # the authors tune alpha at batch 30 and at mid-epoch


class _LastTierHead(nn.Module):
    """Classifier on the last tier of the equilibrium state (optional average pooling, flatten, linear)."""

    def __init__(self, in_features: int, num_classes: int, pool: int | None = None) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        return self.linear(self.pool(z[-1]).flatten(1))


# The authors' solver settings (paper: Peaceman-Rachford, tol 1e-2, 300 iterations, whole-batch residual).
PAPER_SOLVER = MondeqSolverConfig(
    fwd_solver="peaceman_rachford", fwd_tol=1e-2, fwd_max_iter=300,
    bwd_solver="peaceman_rachford", bwd_tol=1e-2, bwd_max_iter=300,
    stop_mode="batch", alpha=1.0, alpha_tuning=True, bwd_bias="prox",
)


@dataclass
class MondeqOptions:
    """monDEQ model options (``model.*`` besides family, arch, name and channels).

    Attributes:
        m: strong-monotonicity parameter of I - W (paper: 1).
        positive_scalars: exp-reparametrise g, gn, h (our deviation; False, the default, follows the authors).
    """

    m: float = 1.0
    positive_scalars: bool = False


class MonDEQ(nn.Module):
    """A monotone operator equilibrium network: z* = relu(W z* + U x + b), logits = head(z*).

    The equilibrium is found without gradient tracking by a splitting solver; the head receives one more
    tracked application relu(W z* + U x + b) whose gradient goes through the implicit backward. The last
    solves' statistics are kept in ``last_stats = {"forward": SolverStats, "backward": SolverStats}`` (the
    backward entry is set during the backward pass and stays until the next one). Convolutional models apply
    W in the frequency domain unless ``solver.mondeq_w="spatial"`` (:class:`.operators.FrequencyW`). Implements
    :class:`pcdeq.family.EquilibriumNet`.

    Args:
        operator: a monotone parameterisation (:class:`DenseMonotone` or :class:`ConvTiersMonotone`).
        head: maps the list of tier states to logits.
        input_shape: (C, H, W) of the images.
        pad_input: zero-pad the image by one pixel (convolutional models) instead of flattening it.
        solver: splitting solver settings; ``solver.alpha`` is the initial step, retuned at batch 30 and
            mid-epoch when ``solver.alpha_tuning`` (see :meth:`on_train_batch_start`).
    """

    family = "mondeq"
    operator: DenseMonotone | ConvTiersMonotone

    def __init__(self, operator: DenseMonotone | ConvTiersMonotone, head: nn.Module,
                 input_shape: tuple[int, int, int], *, pad_input: bool, solver: SolverConfig = PAPER_SOLVER) -> None:
        super().__init__()
        MONDEQ.check_solver(solver)
        self.operator = operator
        self.head = head
        self.input_shape = tuple(input_shape)
        self.pad_input = pad_input
        self.solver = MondeqSolverConfig.of(solver)
        self.alpha = float(self.solver.alpha)
        self.last_stats: dict[str, SolverStats | None] = {"forward": None, "backward": None}

    # alpha is state worth checkpointing (it is tuned during training) but not a parameter
    def get_extra_state(self) -> dict:
        """Checkpointed non-parameter state: ``{"alpha": float}``."""
        return {"alpha": self.alpha}

    def set_extra_state(self, state: dict) -> None:
        """Restore the state saved by :meth:`get_extra_state`."""
        self.alpha = float(state["alpha"])

    @staticmethod
    def _relu(masks: list[Tensor | None]) -> Callable[[list[Tensor]], list[Tensor]]:
        """The forward prox: relu, then zero the border of convolutional tiers."""

        def prox(u: list[Tensor]) -> list[Tensor]:
            out = [torch.relu(ui) for ui in u]
            # in place on relu's fresh output when nothing is tracked (the same numbers, one tensor fewer)
            inplace = not torch.is_grad_enabled()
            return [o if mk is None else o.mul_(mk) if inplace else o * mk for o, mk in zip(out, masks, strict=True)]

        return prox

    def _record_backward(self, stats: SolverStats) -> None:
        self.last_stats["backward"] = stats

    def equilibrium(self, x: Tensor) -> list[Tensor]:
        """The tracked equilibrium state relu(W z* + U x + b), one tensor per tier.

        Args:
            x: images [B, C, H, W] (normalised).

        Returns:
            Per-tier states; under gradient tracking their gradient is the exact implicit one.
        """
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input of shape [B, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(x.shape)}")
        x = nn.functional.pad(x, (1, 1, 1, 1)) if self.pad_input else x.flatten(1)
        bias = self.operator.inject(x)
        masks = self.operator.state_masks(bias[0])
        prox = self._relu(masks)
        alpha, cfg = self.alpha, self.solver
        # W's spectra (frequency mode) are computed once per call, tracked when grad mode is on, and serve the
        # solves (untracked), the tracked application below and this call's backward
        op = self.operator
        freq = op.frequency_weight() if cfg.mondeq_w == "frequency" and isinstance(op, ConvTiersMonotone) else None
        matvec = op.matvec if freq is None else freq.apply
        with torch.no_grad():
            # V is built per call from the current weights and shared with this call's backward
            uses_v = "peaceman_rachford" in (cfg.fwd_solver, cfg.bwd_solver)
            resolvent = None
            if uses_v:
                resolvent = op.resolvent(alpha) if freq is None else freq.resolvent(alpha)
            problem = SplittingProblem(
                linear=matvec,
                resolvent=resolvent.apply if resolvent is not None else None,
                prox=prox,
                bias=[b.detach() for b in bias],
            )
            z, stats = get_solver(cfg.fwd_solver, kind="splitting")(
                problem, alpha, tol=cfg.fwd_tol, max_iter=cfg.fwd_max_iter, stop_mode=cfg.stop_mode)
        self.last_stats["forward"] = stats
        wz = matvec([zi.detach() for zi in z])  # tracked in W, not through z*
        out = prox([w + b for w, b in zip(wz, bias, strict=True)])
        if torch.is_grad_enabled() and any(o.requires_grad for o in out):
            spec = ImplicitBackwardSpec(
                matvec=matvec, resolvent=resolvent,
                active=[(o.detach() > 0).to(o.dtype) for o in out],
                alpha=alpha, solver=cfg, record=self._record_backward,
            )
            out = implicit_backward(out, spec)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images ``x`` [B, C, H, W]."""
        return self.head(self.equilibrium(x))

    @torch.no_grad()
    def forward_iterations(self, x: Tensor, alpha: float) -> int:
        """Forward iteration count at ``alpha`` on batch ``x`` (max_iter for a failed, non-finite solve)."""
        saved = self.alpha
        try:
            self.alpha = alpha
            self.equilibrium(x)
        finally:
            self.alpha = saved
        stats = self.last_stats["forward"]
        assert stats is not None  # set by equilibrium()
        return self.solver.fwd_max_iter if stats.nonfinite else stats.iters

    def tune_alpha(self, x: Tensor) -> float:
        """Apply the authors' alpha-tuning rule on batch ``x``; sets and returns the new alpha."""
        self.alpha = tune_alpha(lambda a: self.forward_iterations(x, a), self.alpha, self.solver.fwd_max_iter)
        return self.alpha

    def on_train_batch_start(self, x: Tensor, batch_idx: int, num_batches: int) -> None:
        """Training hook: retune alpha at batch 30 and at mid-epoch (every epoch) when ``alpha_tuning`` is on.

        Args:
            x: the training batch's images.
            batch_idx: index of the batch within the epoch (0-based).
            num_batches: batches per epoch.
        """
        if self.solver.alpha_tuning and batch_idx in (TUNE_AT_BATCH, num_batches // 2):
            self.tune_alpha(x)

    def solver_stats(self) -> dict[str, dict[str, float]]:
        """Forward/backward statistics of the last solves."""
        return collect_stats(self)

    def project_(self) -> None:
        """Nothing to project: monotonicity holds by construction of W."""

    def epoch_metrics(self) -> dict[str, float]:
        """The splitting step in use (tuned during training)."""
        return {"alpha": self.alpha}

    def residual_history(self) -> list[list[float]]:
        """Forward residual history of the last solve (summed over tiers)."""
        return residual_histories(self)

    def certificate(self) -> dict[str, float]:
        """None: convergence is guaranteed by the strong monotonicity of I - W."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Activation (relu, fixed), variant (none) and forward solver, for results.json."""
        return {"activation": None, "variant": None, "solver": self.solver.fwd_solver}


def _tier_channels(arch: str, channels: int | Sequence[int]) -> tuple[int, ...]:
    chans = (channels,) if isinstance(channels, int) else tuple(channels)
    if arch in ("fc", "conv") and len(chans) != 1:
        raise ConfigError(f"arch {arch!r} takes one width, got channels={channels!r}")
    if arch == "multitier" and len(chans) < 2:
        raise ConfigError(f"arch 'multitier' takes at least two tier widths, got channels={channels!r}")
    if any(int(c) != c or c < 1 for c in chans):
        raise ConfigError(f"channels must be positive integers, got {channels!r}")
    return tuple(int(c) for c in chans)


def build_mondeq(
    arch: str,
    dataset: str,
    *,
    channels: int | Sequence[int] | None = None,
    m: float = 1.0,
    positive_scalars: bool = False,
    solver: SolverConfig | None = None,
) -> MonDEQ:
    """Build a monDEQ with the authors' sizes for ``dataset`` (or ``channels``).

    Args:
        arch: "fc", "conv" (single convolution) or "multitier".
        dataset: a name from :data:`pcdeq.dataset_specs.DATASET_SPECS` (gives input shape and classes).
        channels: hidden width (fc, conv) or per-tier channels (multitier); None for the sizes above.
        m: strong-monotonicity parameter of I - W (paper: 1).
        positive_scalars: exp-reparametrise g, gn, h (conv models; our deviation: the authors use raw scalars,
            which can turn negative and make sqrt(g) NaN).
        solver: splitting settings (default :data:`PAPER_SOLVER`: Peaceman-Rachford, alpha 1 with tuning,
            tol 1e-2, 300 iterations, whole-batch residual). Forward-backward needs
            alpha <= 2m / ||I - W||^2 (about 0.125 or less on trained models): alpha tuning only starts at
            batch 30, so pass a small ``solver.alpha`` with it.

    Returns:
        A :class:`MonDEQ` mapping images [B, C, H, W] to logits [B, classes].
    """
    MONDEQ.check_arch(arch)
    spec = get_spec(dataset)
    solver = solver if solver is not None else PAPER_SOLVER
    c_in, h, w = spec.shape
    chans = _tier_channels(arch, MONDEQ.paper_size(arch, dataset) if channels is None else channels)
    if arch == "fc":
        operator: DenseMonotone | ConvTiersMonotone = DenseMonotone(c_in * h * w, chans[0], m=m)
        head = _LastTierHead(chans[0], spec.num_classes)
    else:
        grid = (h + 2, w + 2)  # the image is zero-padded by one pixel
        operator = ConvTiersMonotone(c_in, chans, grid, m=m, positive_scalars=positive_scalars)
        if arch == "conv":
            head = _LastTierHead(chans[0] * (grid[0] // 4) * (grid[1] // 4), spec.num_classes, pool=4)
        else:
            s1, s2 = operator.grids[-1]
            head = _LastTierHead(chans[-1] * s1 * s2, spec.num_classes)
    return MonDEQ(operator, head, spec.shape, pad_input=arch != "fc", solver=solver)


MONDEQ = register_family(Family(
    name="mondeq",
    archs=ARCHS,
    sizes=PAPER_SIZES,
    default_sizes={arch: sizes["mnist"] for arch, sizes in PAPER_SIZES.items()},
    build=build_mondeq,
    solver_kind="splitting",
    default_solver=PAPER_SOLVER,
    protocols={arch: f"mondeq_{arch}" for arch in ARCHS},
    options=MondeqOptions,
))
