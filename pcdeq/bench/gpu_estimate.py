"""Estimate the wall time of each table's full protocol on one GPU, from the work of a measured training step.

An ESTIMATE, not a measurement: no GPU was available when the figures in the README were made. For every row of
a table spec it builds the row's real network and data shapes, runs one training step and one evaluation step on
the CPU under ``torch.utils.flop_counter.FlopCounterMode`` (which counts matrix products and convolutions,
forward and backward; FFTs are not counted, so monDEQ is underestimated), and records the solver iterations of
that step. The GPU time of a step is then modelled as

    max(FLOPs / THROUGHPUT, iterations * LATENCY) + OVERHEAD

with THROUGHPUT = 20 TFLOP/s (float32 convolutions of these sizes on an H100-class GPU), LATENCY = 0.15 ms per
solver iteration (kernel launches and one host synchronisation for the stopping rule) and OVERHEAD = 2 ms per
step (optimiser, explicit layers, data, Lightning). Iterations of fresh weights are scaled by 1.5, the growth
measured over a real MNIST training run (about 8 -> 12 forward iterations). Seeds, epochs, batch size and
dataset size come from the configs.

    python -m pcdeq.bench.gpu_estimate --tables mnist,svhn,cifar10,cifar10_aug
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from pcdeq.reproduction.plan import train_jobs
from pcdeq.reproduction.specs import PROJECT_ROOT, list_specs, load_profile, load_spec
from pcdeq.training.config import net_from_config

THROUGHPUT = 20e12
LATENCY = 0.15e-3
OVERHEAD = 2e-3
ITER_GROWTH = 1.5
TRAIN_SIZE = {"mnist": 60000, "svhn": 73257, "cifar10": 50000, "cifar10_aug": 50000, "digits": 1437}
TEST_SIZE = {"mnist": 10000, "svhn": 26032, "cifar10": 10000, "cifar10_aug": 10000, "digits": 360}


class _TotalOnly:
    """A stand-in for FlopCounterMode's per-module tracker: the estimate needs only the total, and the tracker's
    backward hooks fail inside an adjoint ODE solve (torchdiffeq calls ``autograd.grad`` within ``backward``)."""

    parents = ("Global",)  # the one bucket get_total_flops() sums

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def _flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()  # type: ignore[assignment]
    return counter


def step_cost(config: dict, batch: int) -> tuple[float, float, float, float]:
    """(training FLOPs, training iterations, evaluation FLOPs, evaluation iterations) of one step."""
    net = net_from_config(config)
    assert isinstance(net, torch.nn.Module)
    shape = {"mnist": (1, 28, 28), "digits": (1, 8, 8)}.get(config["dataset"]["name"], (3, 32, 32))
    x, y = torch.rand(batch, *shape), torch.randint(10, (batch,))
    with _flop_counter() as train_counter:
        F.cross_entropy(net(x), y).backward()
    stats = net.solver_stats()
    train_iters = stats["forward"]["iters"] + stats["backward"]["iters"] + 1
    with torch.no_grad(), _flop_counter() as eval_counter:
        net.eval()
        net(x)
    eval_iters = net.solver_stats()["forward"]["iters"] + 1
    return (train_counter.get_total_flops(), train_iters * ITER_GROWTH, eval_counter.get_total_flops(),
            eval_iters * ITER_GROWTH)


def seconds(flops: float, iters: float) -> float:
    return max(flops / THROUGHPUT, iters * LATENCY) + OVERHEAD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="mnist,svhn,cifar10,cifar10_aug")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    profile = load_profile("full")
    tables = list_specs() if args.tables == "all" else args.tables.split(",")
    print(f"{'table':<12} {'row':<34} {'runs':>4} {'epochs':>6} {'s/epoch':>8} {'GPU hours':>9}  (ESTIMATE)")
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        for name in tables:
            spec = load_spec(name)
            total = 0.0
            for row in spec.rows:
                jobs = train_jobs(spec, profile, row=row)
                first = [o for o in jobs[0][1].overrides if not o.startswith("seed=")]
                cfg = compose("train", overrides=[f"experiment={row.experiment}", *first])
                config: dict[str, Any] = {k: OmegaConf.to_container(cfg[k], resolve=True)
                                          for k in ("model", "dataset", "solver")}
                batch, epochs = int(cfg.dataset.batch_size), int(cfg.trainer.max_epochs)
                dataset = config["dataset"]["name"]
                tf, ti, ef, ei = step_cost(config, batch)
                epoch_s = (math.ceil(TRAIN_SIZE[dataset] / batch) * seconds(tf, ti)
                           + math.ceil(TEST_SIZE[dataset] / batch) * seconds(ef, ei))
                hours = len(jobs) * epochs * epoch_s / 3600
                total += hours
                print(f"{spec.name:<12} {row.label[:34]:<34} {len(jobs):>4} {epochs:>6} {epoch_s:>8.1f} {hours:>9.1f}")
            print(f"{spec.name:<12} {'total':<34} {'':>4} {'':>6} {'':>8} {total:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
