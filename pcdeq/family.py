"""Model families: the contract every equilibrium network implements, and the registry of families.

A *family* is a kind of implicit model (pcDEQ, monDEQ, ...). Each one registers a :class:`Family` record that
says which architectures it has, the published hidden sizes per dataset, how to build a network, which solvers
it accepts and the training protocol each architecture follows by default. Every network a family builds
implements :class:`EquilibriumNet`; the training stack, the benchmarks and the reproduction pipeline talk to
networks only through that contract, never through attribute guesses.

Adding a family takes one module that calls :func:`register_family` and one config file
``conf/model/<family>_<arch>.yaml`` (see the README, "Adding a model family"). A family named ``name`` that is
not registered yet is imported from the module ``pcdeq.families.<name>`` on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

from pcdeq.dataset_specs import get_spec
from pcdeq.errors import ConfigError
from pcdeq.solver import SOLVER_KINDS, solver_kind
from pcdeq.solver.config import SolverConfig

Tensor = torch.Tensor
Size = int | tuple[int, ...]

# What EquilibriumNet.certificate() may report, and how the training loop aggregates each over an epoch.
# cw_uncertified is 1 for a batch whose bound is >= 1, so its epoch sum counts the batches not certified.
CERTIFICATE_KEYS: dict[str, str] = {"cw_bound_max": "max", "cw_bound_mean": "max", "cw_uncertified": "sum",
                                    "contraction": "max"}


@runtime_checkable
class EquilibriumNet(Protocol):
    """What every equilibrium network offers besides ``forward(x) -> logits``.

    Attributes:
        family: the registry name of the network's family.
    """

    family: str

    def __call__(self, x: Tensor) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def solver_stats(self) -> dict[str, dict[str, float]]:
        """Statistics of the last forward and backward solves (see :func:`pcdeq.solver.stats.collect_stats`)."""
        ...

    def project_(self) -> None:
        """Restore the parameter constraints after an optimizer step (a no-op when there are none)."""
        ...

    def on_train_batch_start(self, x: Tensor, batch_idx: int, num_batches: int) -> None:
        """Per-batch hook before the training step (e.g. monDEQ's alpha tuning)."""
        ...

    def epoch_metrics(self) -> dict[str, float]:
        """Extra per-epoch figures to log as ``train/<key>`` (e.g. monDEQ's tuned alpha)."""
        ...

    def residual_history(self) -> list[list[float]]:
        """Per equilibrium solve of the last forward pass, its stopping residual after each iteration."""
        ...

    def certificate(self) -> dict[str, float]:
        """A convergence certificate of the last forward pass: keys of :data:`CERTIFICATE_KEYS` ({} for none)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The network's entries in results.json: ``activation``, ``variant`` and ``solver``."""
        ...


@dataclass(frozen=True)
class Family:
    """A registered model family.

    Attributes:
        name: registry key, also ``model.family`` in the configs.
        archs: architecture names (``model.arch``).
        sizes: arch -> dataset -> hidden size of the published model (or this project's choice, marked so in
            the family's module).
        default_sizes: arch -> size for a dataset that ``sizes`` does not list.
        build: ``build(arch, dataset, *, channels, solver, **options) -> EquilibriumNet``.
        solver_kind: the kind of registered solver the family runs (see :func:`pcdeq.solver.register_solver`).
        default_solver: solver settings used when none are given (the paper's): an instance of the family's
            class of solver settings, :class:`~pcdeq.solver.config.SolverConfig` or a subclass that declares the
            family's own solver keys (see :attr:`solver_class`).
        protocols: arch -> training protocol set, ``conf/protocol/<set>/<dataset>.yaml``.
        options: a dataclass of the family's model options with their types and defaults (``activation``,
            ``m``, ...): the keys of ``conf/model/<family>.yaml`` besides family, arch, name and channels. The
            training stack turns it into the config schema of the family's model files.
    """

    name: str
    archs: tuple[str, ...]
    sizes: Mapping[str, Mapping[str, Size]]
    default_sizes: Mapping[str, Size]
    build: Callable[..., EquilibriumNet]
    solver_kind: str
    default_solver: SolverConfig
    protocols: Mapping[str, str]
    options: type | None = None

    def check_arch(self, arch: str) -> None:
        """Raise ConfigError for an architecture the family does not have."""
        if arch not in self.archs:
            raise ConfigError(f"unknown {self.name} architecture {arch!r}; valid choices: {', '.join(self.archs)}")

    def paper_size(self, arch: str, dataset: str) -> Size:
        """Hidden size of the published model for (arch, dataset), or the family's default for that arch."""
        self.check_arch(arch)
        get_spec(dataset)
        return self.sizes[arch].get(dataset, self.default_sizes[arch])

    def option_names(self) -> tuple[str, ...]:
        """Names of the family's model options."""
        return tuple(f.name for f in fields(self.options)) if self.options is not None else ()

    @property
    def solver_class(self) -> type[SolverConfig]:
        """The family's class of solver settings (the class of ``default_solver``): its fields are the solver keys
        the family reads."""
        return type(self.default_solver)

    def check_solver(self, solver: SolverConfig) -> None:
        """Raise ConfigError when the forward or backward solver is not of this family's kind."""
        for name in (solver.fwd_solver, solver.bwd_solver):
            if solver_kind(name) != self.solver_kind:
                valid = [n for n, k in SOLVER_KINDS.items() if k == self.solver_kind]
                raise ConfigError(
                    f"solver {name!r} is not for {self.name} models; use "
                    + " or ".join(f"solver={v}" for v in valid) + f" for {self.name}_* models"
                )


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) a family in the registry and return it."""
    unknown = set(family.protocols) ^ set(family.archs)
    if unknown:
        raise ValueError(f"family {family.name!r}: protocols must name every arch exactly once ({sorted(unknown)})")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The registered family ``name``; a family not registered yet is imported from ``pcdeq.families.<name>``.

    Raises:
        ConfigError: no such family; the message lists the registered ones.
    """
    if name not in FAMILIES:
        try:
            importlib.import_module(f"pcdeq.families.{name}")
        except ImportError:
            pass
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; valid choices: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def build_net(family: str, arch: str, dataset: str, *, channels: Size | None = None,
              solver: SolverConfig | None = None, **options: Any) -> EquilibriumNet:
    """Build a network of any registered family by name.

    Args:
        family: registry name ("pcdeq", "mondeq", ...).
        arch: one of the family's architectures.
        dataset: dataset name (gives the input shape and the number of classes).
        channels: hidden size; None takes the published size for the dataset.
        solver: solver settings; None takes the family's default (the paper's).
        **options: the family's model options (e.g. ``activation="sigmoid"`` for pcDEQ, ``m=1.0`` for monDEQ).

    Returns:
        The network, which implements :class:`EquilibriumNet`.
    """
    fam = get_family(family)
    fam.check_arch(arch)
    valid = fam.option_names()
    unknown = set(options) - set(valid)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))} for {family} models; valid: "
                          f"{', '.join(valid) or 'none'}")
    solver = fam.solver_class.of(solver) if solver is not None else fam.default_solver
    fam.check_solver(solver)
    size = fam.paper_size(arch, dataset) if channels is None else channels
    return fam.build(arch, dataset, channels=size, solver=solver, **options)


def solver_fields() -> dict[str, tuple[type[SolverConfig], Field[Any]]]:
    """Every solver key of the registered families, the shared ones first: key -> (a class declaring it, its field).

    The ``solver`` config group's schema (``solver.<key>`` on the command line) and the benchmarks' switches are
    built from it. Two families may declare the same key only alike (type, default, declared range).

    Raises:
        ValueError: two families declare one key differently.
    """
    out: dict[str, tuple[type[SolverConfig], Field[Any]]] = {f.name: (SolverConfig, f) for f in fields(SolverConfig)}
    for fam in FAMILIES.values():
        cls = fam.solver_class
        for f in fields(cls):
            if f.name not in out:
                out[f.name] = (cls, f)
                continue
            owner, known = out[f.name]
            if (known.type, known.default, known.metadata) != (f.type, f.default, f.metadata):
                raise ValueError(f"solver.{f.name} is declared differently by {owner.__name__} and {cls.__name__}")
    return out
