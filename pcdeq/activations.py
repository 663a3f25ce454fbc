"""Concave activations and their pcDEQ variants, in one registry.

A pcDEQ layer iterates z <- sigma(W z + inj(x)) with W >= 0. The theory needs sigma nondecreasing, concave and
positive on the nonnegative orthant and inj(x) >= 0; each *variant* fixes the injection that makes the pair valid:

* ``pcdeq1``: sigma in {tanh, softsign, relu6}, injection softplus(x, beta=5) (strictly positive).
* ``pcdeq2``: sigma = sigmoid (positive at 0, concave on [0, inf)), injection relu(x).

Register another activation with :func:`register_activation`; it is checked numerically for monotonicity and
concavity on [0, 20] unless ``check=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pcdeq.errors import ConfigError

Tensor = torch.Tensor


def _softplus5(x: Tensor) -> Tensor:
    return F.softplus(x, beta=5)


INJECTIONS: dict[str, Callable[[Tensor], Tensor]] = {"pcdeq1": _softplus5, "pcdeq2": F.relu}


@dataclass(frozen=True)
class Activation:
    """A registered activation: its name, function and the pcDEQ variant it belongs to."""

    name: str
    fn: Callable[[Tensor], Tensor]
    variant: str

    @property
    def injection(self) -> Callable[[Tensor], Tensor]:
        return INJECTIONS[self.variant]


ACTIVATIONS: dict[str, Activation] = {}


def _valid_choices() -> str:
    return ", ".join(f"{a.name} ({a.variant})" for a in ACTIVATIONS.values())


def _check_concave(name: str, fn: Callable[[Tensor], Tensor]) -> None:
    """Reject a function that is not nondecreasing and concave on [0, 20] (finite differences, float64)."""
    t = torch.linspace(0.0, 20.0, 2001, dtype=torch.float64)
    y = fn(t)
    if not torch.isfinite(y).all():
        raise ValueError(f"activation {name!r} is not finite on [0, 20]")
    d1 = y.diff()
    d2 = d1.diff()
    tol = 1e-9 * max(1.0, float(y.abs().max()))
    if (d1 < -tol).any():
        raise ValueError(f"activation {name!r} is not nondecreasing on [0, inf); pcDEQ needs a monotone map")
    if (d2 > tol).any():
        raise ValueError(f"activation {name!r} is not concave on [0, inf); pcDEQ needs a concave map")


def register_activation(name: str, fn: Callable[[Tensor], Tensor], variant: str, check: bool = True) -> Activation:
    """Add an activation to the registry.

    Args:
        name: registry key (used as ``model.activation=<name>``).
        fn: elementwise torch function, nondecreasing and concave on [0, inf).
        variant: "pcdeq1" (softplus(beta=5) injection) or "pcdeq2" (relu injection). With relu injection
            the pre-activation can be 0, so sigma(0) must be > 0 for positivity.
        check: verify monotonicity/concavity (and sigma(0) > 0 for pcdeq2) numerically.

    Returns:
        The registered :class:`Activation`.
    """
    if variant not in INJECTIONS:
        raise ConfigError(f"unknown variant {variant!r}; valid choices: {', '.join(INJECTIONS)}")
    if check:
        _check_concave(name, fn)
        if variant == "pcdeq2" and not float(fn(torch.zeros((), dtype=torch.float64))) > 0:
            raise ValueError(f"activation {name!r} has sigma(0) <= 0; the pcdeq2 variant (relu injection) needs > 0")
    act = Activation(name, fn, variant)
    ACTIVATIONS[name] = act
    return act


def get_activation(name: str, variant: str | None = None) -> Activation:
    """Look an activation up, optionally insisting on its variant.

    Raises:
        ConfigError: unknown name, or a name paired with the wrong variant; the message lists the valid choices.
    """
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; valid choices: {_valid_choices()}")
    act = ACTIVATIONS[name]
    if variant is not None and variant != act.variant:
        valid = ", ".join(a.name for a in ACTIVATIONS.values() if a.variant == variant) or "none"
        raise ConfigError(
            f"activation {name!r} belongs to variant {act.variant!r}, not {variant!r}; "
            f"valid activations for {variant!r}: {valid} (all: {_valid_choices()})"
        )
    return act


register_activation("tanh", torch.tanh, "pcdeq1")
register_activation("softsign", F.softsign, "pcdeq1")
register_activation("relu6", F.relu6, "pcdeq1")
register_activation("sigmoid", torch.sigmoid, "pcdeq2")
