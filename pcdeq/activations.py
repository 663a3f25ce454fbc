"""Concave activations and their pcDEQ variants, in one registry.

A pcDEQ layer iterates z <- sigma(W z + inj(x)) with W >= 0. The theory needs sigma nondecreasing, concave and
positive on the nonnegative orthant and inj(x) >= 0; each *variant* fixes the injection that makes the pair valid:

* ``pcdeq1``: sigma in {tanh, softsign, relu6}, injection softplus(x, beta=5) (strictly positive).
* ``pcdeq2``: sigma = sigmoid (positive at 0, concave on [0, inf)), injection relu(x).

Register another activation with :func:`register_activation`; it is checked numerically for monotonicity and
concavity on [0, 20] unless ``check=False``.

For the fast implicit backward each activation may also give sigma' as a function of its output y = sigma(p)
(``deriv``: tanh 1 - y^2, sigmoid y (1 - y), softsign (1 - |y|)^2, relu6 1[0 < y < 6]) and an in-place version
(``fn_``); without them the layer falls back to autograd at the pre-activation and to out-of-place calls.
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
    """A registered activation: its name, function and the pcDEQ variant it belongs to.

    Attributes:
        deriv: sigma'(p) computed from the output y = sigma(p), or None (then autograd at p is used).
        fn_: sigma applied in place (same values as ``fn``), or None.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    variant: str
    deriv: Callable[[Tensor], Tensor] | None = None
    fn_: Callable[[Tensor], Tensor] | None = None

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


def _check_deriv(name: str, fn: Callable[[Tensor], Tensor], deriv: Callable[[Tensor], Tensor]) -> None:
    """Reject a ``deriv`` that does not give autograd's sigma' from sigma's output on [-5, 5] (float64)."""
    p = torch.linspace(-5.0, 5.0, 1001, dtype=torch.float64, requires_grad=True)
    y = fn(p)
    (expected,) = torch.autograd.grad(y.sum(), p)
    if not torch.allclose(deriv(y.detach()), expected, rtol=1e-6, atol=1e-9):
        raise ValueError(f"the derivative given for activation {name!r} does not match autograd's on [-5, 5]")


def _softsign_(t: Tensor) -> Tensor:
    return t.div_(t.abs().add_(1))  # the same operations as F.softsign: x / (|x| + 1)


def register_activation(name: str, fn: Callable[[Tensor], Tensor], variant: str, check: bool = True,
                        deriv: Callable[[Tensor], Tensor] | None = None,
                        fn_: Callable[[Tensor], Tensor] | None = None) -> Activation:
    """Add an activation to the registry.

    Args:
        name: registry key (used as ``model.activation=<name>``).
        fn: elementwise torch function, nondecreasing and concave on [0, inf).
        variant: "pcdeq1" (softplus(beta=5) injection) or "pcdeq2" (relu injection). With relu injection
            the pre-activation can be 0, so sigma(0) must be > 0 for positivity.
        check: verify monotonicity/concavity (and sigma(0) > 0 for pcdeq2) numerically.
        deriv: optional sigma' as a function of sigma's output (the analytic backward); checked against autograd
            when ``check``.
        fn_: optional in-place version of ``fn``.

    Returns:
        The registered :class:`Activation`.
    """
    if variant not in INJECTIONS:
        raise ConfigError(f"unknown variant {variant!r}; valid choices: {', '.join(INJECTIONS)}")
    if check:
        _check_concave(name, fn)
        if variant == "pcdeq2" and not float(fn(torch.zeros((), dtype=torch.float64))) > 0:
            raise ValueError(f"activation {name!r} has sigma(0) <= 0; the pcdeq2 variant (relu injection) needs > 0")
        if deriv is not None:
            _check_deriv(name, fn, deriv)
    act = Activation(name, fn, variant, deriv, fn_)
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


# The closed forms are module-level functions, not lambdas, so that layers (which hold their Activation) pickle.
def _tanh_deriv(y: Tensor) -> Tensor:
    return 1 - y * y


def _softsign_deriv(y: Tensor) -> Tensor:
    return (1 - y.abs()).square()


def _relu6_deriv(y: Tensor) -> Tensor:
    return ((y > 0) & (y < 6)).to(y.dtype)


def _relu6_(t: Tensor) -> Tensor:
    return t.clamp_(0, 6)


def _sigmoid_deriv(y: Tensor) -> Tensor:
    return y * (1 - y)


register_activation("tanh", torch.tanh, "pcdeq1", deriv=_tanh_deriv, fn_=torch.tanh_)
register_activation("softsign", F.softsign, "pcdeq1", deriv=_softsign_deriv, fn_=_softsign_)
register_activation("relu6", F.relu6, "pcdeq1", deriv=_relu6_deriv, fn_=_relu6_)
register_activation("sigmoid", torch.sigmoid, "pcdeq2", deriv=_sigmoid_deriv, fn_=torch.sigmoid_)
