"""From a composed Hydra config to objects: resolvers, validation, the network and the data module.

Everything here takes the plain resolved dict (``OmegaConf.to_container(cfg, resolve=True)``) so that the same
code rebuilds a network from the config stored in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from pcdeq.solvers import SolverConfig

MODEL_FAMILIES = {"pcdeq": ("linear", "conv", "multiconv"), "mondeq": ("fc", "conv", "multitier")}


class ConfigError(ValueError):
    """A user-facing configuration problem (one line that names the key and the fix)."""


def check_model(family: str, arch: str) -> None:
    """Validate a (family, arch) pair; the error lists every valid model."""
    if family not in MODEL_FAMILIES or arch not in MODEL_FAMILIES[family]:
        valid = ", ".join(f"{f}_{a}" for f, archs in MODEL_FAMILIES.items() for a in archs)
        raise ConfigError(f"unknown model {family}_{arch}; valid choices: {valid}")


def paper_channels(family: str, arch: str, dataset: str) -> Any:
    """Hidden size of the published model for a dataset (the ``${paper_channels:...}`` resolver)."""
    check_model(family, arch)
    if family == "pcdeq":
        from pcdeq.models import paper_channels as pc
    else:
        from pcdeq.mondeq import paper_channels as pc
    size = pc(arch, dataset)
    return list(size) if isinstance(size, tuple) else size


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("paper_channels"):
        OmegaConf.register_new_resolver("paper_channels", paper_channels)


register_resolvers()


def solver_config(solver: Mapping) -> SolverConfig:
    """pcDEQ :class:`SolverConfig` from the ``solver`` group (its ``family`` key must be pcdeq)."""
    keys = {k: v for k, v in solver.items() if k in SolverConfig.__dataclass_fields__}
    try:
        return SolverConfig(**keys)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_net(cfg: Mapping) -> nn.Module:
    """The network described by a resolved config (keys model, dataset, solver)."""
    model, solver = cfg["model"], cfg["solver"]
    family, arch = model["family"], model["arch"]  # the model's name is only a label
    check_model(family, arch)
    if solver.get("family") != family:
        raise ConfigError(
            f"solver {solver.get('fwd_solver', solver.get('name'))!r} is for {solver.get('family')} models, not "
            f"{model['name']}; use solver=fixed_point or solver=anderson for pcdeq_*, "
            "solver=peaceman_rachford or solver=forward_backward for mondeq_*"
        )
    try:
        if family == "pcdeq":
            from pcdeq.models import build_model

            return build_model(arch, cfg["dataset"]["name"], model["activation"], channels=model["channels"],
                               variant=model.get("variant"), solver=solver_config(solver))
        from pcdeq.mondeq import build_mondeq

        kwargs = {k: v for k, v in solver.items() if k != "family"}
        extra = {k: model[k] for k in ("m", "positive_scalars") if k in model}
        return build_mondeq(arch, cfg["dataset"]["name"], channels=model["channels"], **extra, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_datamodule(cfg: Mapping, seed: int):
    """The Lightning data module of the ``dataset`` group."""
    from pcdeq.data import EquilibriumDataModule

    d = cfg["dataset"]
    return EquilibriumDataModule(
        d["name"], data_dir=d["data_dir"], batch_size=int(d["batch_size"]), download=bool(d["download"]),
        synthetic=bool(d["synthetic"]), synthetic_size=tuple(d["synthetic_size"]), normalize=bool(d["normalize"]),
        val_size=int(d["val_size"]), num_workers=int(d["num_workers"]), seed=seed,
    )
