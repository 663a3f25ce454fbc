"""Helpers shared by several test modules (composing the Hydra config, small monDEQ models).

Test modules import these from here, never from one another, so that each test module stays independent.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcdeq.mondeq import build_mondeq
from pcdeq.solvers import SolverConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_train(*overrides: str):
    """The train config composed from conf/ with these overrides (unresolved, outside a Hydra job)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def resolved(cfg, *keys: str) -> dict:
    """Resolve selected sub-trees (paths.output_dir needs a running Hydra job, the rest does not)."""
    return {k: OmegaConf.to_container(OmegaConf.select(cfg, k), resolve=True) if OmegaConf.is_config(
        OmegaConf.select(cfg, k)) else OmegaConf.select(cfg, k) for k in keys}


# monDEQ channels of the tiny digits models, per architecture
TINY = {"fc": 6, "conv": 3, "multitier": (2, 3, 4)}


def splitting(solver: str = "peaceman_rachford", alpha: float = 1.0, tol: float = 1e-2, max_iter: int = 300,
              **kw) -> SolverConfig:
    """monDEQ solver settings, the same forward and backward (as the authors)."""
    return SolverConfig(fwd_solver=solver, bwd_solver=solver, alpha=alpha, fwd_tol=tol, bwd_tol=tol,
                        fwd_max_iter=max_iter, bwd_max_iter=max_iter, **{"stop_mode": "batch", **kw})


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, m: float = 1.0,
               **solver_kw) -> torch.nn.Module:
    """A small digits model with randomised scalars (so g, gn, h != 1 are exercised too).

    The scalars are drawn as logarithms (positive_scalars=True), so they stay positive whatever the draw.
    """
    torch.manual_seed(seed)
    model = build_mondeq(arch, "digits", channels=TINY[arch], m=m, positive_scalars=True,
                         solver=splitting(**solver_kw)).to(dtype)
    op = model.operator
    with torch.no_grad():
        for name in ("g_param", "h_param", "gn_param"):
            p = getattr(op, name, None)
            if p is not None:
                p.uniform_(-0.5, 0.5)
    return model
