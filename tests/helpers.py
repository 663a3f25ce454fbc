"""Helpers shared by several test modules (composing the Hydra config, small monDEQ models, the CLI in process).

Test modules import these from here, never from one another, so that each test module stays independent.
"""

from __future__ import annotations

import contextlib
import io
import logging
import runpy
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcdeq.families.mondeq import build_mondeq
from pcdeq.families.mondeq.solver_config import MondeqSolverConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")
_HOLD = ("import sys, time\nfrom pcdeq.training.runlock import run_lock\nwith run_lock(sys.argv[1]):\n"
         "    print('held', flush=True)\n    time.sleep(120)\n")


@contextlib.contextmanager
def held_by_another_process(run_dir: Path) -> Iterator[subprocess.Popen]:
    """A second Python process holding ``run_dir``'s run lock until the block ends (then SIGKILLed, not released)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=Path(CONF).parent,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


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
              **kw) -> MondeqSolverConfig:
    """monDEQ solver settings, the same forward and backward (as the authors)."""
    return MondeqSolverConfig(fwd_solver=solver, bwd_solver=solver, alpha=alpha, fwd_tol=tol, bwd_tol=tol,
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


def run_entry_point(script: Path, *argv: str) -> tuple[int, str]:
    """Run ``python script argv...`` inside this process: the script's own ``__main__`` block, Hydra included.

    The same code path as the command line without the cost of starting Python and importing torch again.
    Returns the exit status and what went to stderr; the root logger's handlers that Hydra installs for the
    job are removed again afterwards, so later tests do not log into this run's directory.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    old_argv, err = sys.argv[:], io.StringIO()
    sys.argv = [str(script), *argv]
    status = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    return status, err.getvalue()
