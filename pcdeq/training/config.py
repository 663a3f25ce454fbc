"""From a composed Hydra config to objects: the config resolvers, the network and the data module.

Everything here takes the plain resolved dict (``OmegaConf.to_container(cfg, resolve=True)``) so that the same
code rebuilds a network from the config stored in a checkpoint. Importing this module registers the resolvers
and the config schemas (:mod:`pcdeq.training.schema`), so the entry points import it before Hydra composes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from omegaconf import OmegaConf

from pcdeq.errors import ConfigError
from pcdeq.family import EquilibriumNet, Family, build_net, get_family
from pcdeq.solver.config import SolverConfig
from pcdeq.training import schema  # noqa: F401  (registers the config schemas in Hydra's ConfigStore)
from pcdeq.training.data import EquilibriumDataModule
from pcdeq.training.device import loader_settings


def paper_channels(family: str, arch: str, dataset: str) -> Any:
    """Hidden size of the published model for a dataset (the ``${paper_channels:...}`` resolver)."""
    size = get_family(family).paper_size(arch, dataset)
    return list(size) if isinstance(size, tuple) else size


def run_slug(override_dirname: str) -> str:
    """A directory name from Hydra's ``override_dirname`` that can itself be passed back as an override value.

    ``model.activation=tanh,model.channels=[3,4,5],seed=0`` -> ``model.activation-tanh__model.channels-3x4x5__seed-0``
    (Hydra's override grammar reads ``=``, ``,`` and brackets in a path as syntax).
    """
    items = [i for i in _split_top(override_dirname) if i]
    out = []
    for item in items:
        key, _, value = item.partition("=")
        value = value.replace("[", "").replace("]", "").replace(",", "x").replace("/", "-").replace("'", "")
        out.append(f"{key}-{value}" if value else key)
    return "__".join(out) or "default"


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("paper_channels"):
        OmegaConf.register_new_resolver("paper_channels", paper_channels)
    if not OmegaConf.has_resolver("run_slug"):
        OmegaConf.register_new_resolver("run_slug", run_slug)


register_resolvers()


def solver_config(solver: Mapping, family: Family) -> SolverConfig:
    """The family's solver settings (:attr:`~pcdeq.family.Family.solver_class`) from the resolved ``solver`` group.

    The group holds every family's keys (one flat schema); the family's class takes the shared keys and its own.
    """
    names = {f.name for f in fields(family.solver_class)}
    return family.solver_class(**{k: v for k, v in solver.items() if k in names})


def net_from_config(cfg: Mapping) -> EquilibriumNet:
    """The network described by a resolved config (keys model, dataset, solver).

    Raises:
        ConfigError: an unknown family, architecture, activation or solver, or a solver of another family.
    """
    model = cfg["model"]
    family = get_family(model["family"])
    options = {k: model[k] for k in family.option_names() if k in model}
    return build_net(family.name, model["arch"], cfg["dataset"]["name"], channels=model["channels"],
                     solver=solver_config(cfg["solver"], family), **options)


def datamodule_from_config(cfg: Mapping, seed: int) -> EquilibriumDataModule:
    """The Lightning data module of the resolved ``dataset`` group."""
    d = cfg["dataset"]
    num_workers, pin_memory = loader_settings(cfg)  # null: the defaults of the run's device
    try:
        return EquilibriumDataModule(
            d["name"], data_dir=d["data_dir"], batch_size=int(d["batch_size"]),
            eval_batch_size=d.get("eval_batch_size"), download=bool(d["download"]),
            synthetic=bool(d["synthetic"]), synthetic_size=tuple(d["synthetic_size"]),
            normalize=bool(d["normalize"]), val_size=int(d["val_size"]), num_workers=num_workers,
            seed=seed, pin_memory=pin_memory,
        )
    except ValueError as e:
        raise ConfigError(f"dataset: {e}") from None
