"""Per-step CPU time and function evaluations of the Neural ODE rows, on real data (issue 22).

    nice python -m pcdeq.bench.node_steps --data-dir /path/with/MNIST/raw/.. --steps 6 \
        --json results/bench/cpu_node_mnist.json

Each experiment (``conf/experiment/<name>.yaml``: the paper's model, protocol and solver) trains from its seed-0
initialisation on the first ``--steps`` training batches in order (batch 256, Adam 1e-3, the adjoint backward) and
then evaluates ``--eval-steps`` test batches without gradients, in one thread. Reported per step: wall time, NFE
(forward) and BNFE (adjoint backward) and the loss; and the epoch estimate (mean training step x batches per
epoch + mean evaluation step x test batches). The NFE of a trained model is larger than at initialisation, so the
estimate is a lower bound for later epochs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pcdeq.bench.setup import CONF
from pcdeq.training.config import datamodule_from_config, net_from_config
from pcdeq.training.optim import build_optimizer


def resolved_config(experiment: str, data_dir: str, output_dir: str) -> dict:
    """The experiment's training config on real data (no download)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.data_dir={data_dir}",
                                          "dataset.download=false", f"paths.output_dir={output_dir}"])
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return config


def measure(experiment: str, data_dir: str, steps: int, eval_steps: int) -> dict:
    """Train ``steps`` batches and evaluate ``eval_steps`` test batches; the per-step figures."""
    with tempfile.TemporaryDirectory() as tmp:
        config = resolved_config(experiment, data_dir, tmp)
    torch.manual_seed(int(config["seed"]))
    net = net_from_config(config)
    optimizer = build_optimizer(net.parameters(), config["optim"])
    dm = datamodule_from_config(config, seed=int(config["seed"]))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train_rows: list[dict] = []
    eval_rows: list[dict] = []
    train_seconds: list[float] = []
    eval_seconds: list[float] = []
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == steps:
            break
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)  # the training step of the Lightning module, without Lightning
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds = time.perf_counter() - t0
        train_seconds.append(seconds)
        stats = net.solver_stats()
        train_rows.append({"step": i + 1, "seconds": seconds, "nfe": stats["forward"]["iters"],
                           "bnfe": stats.get("backward", {}).get("iters"), "loss": loss.item()})
        print(f"{experiment} train step {i + 1}: {seconds:.2f} s, NFE {train_rows[-1]['nfe']:.0f}, "
              f"BNFE {train_rows[-1]['bnfe']}, loss {loss.item():.4f}", file=sys.stderr, flush=True)
    with torch.no_grad():
        for i, (x, _) in enumerate(dm.test_dataloader()):
            if i == eval_steps:
                break
            t0 = time.perf_counter()
            net(x)
            eval_seconds.append(time.perf_counter() - t0)
            eval_rows.append({"step": i + 1, "seconds": eval_seconds[-1],
                              "nfe": net.solver_stats()["forward"]["iters"]})
    batch = int(config["dataset"]["batch_size"])
    train_batches = len(dm.train_dataloader())  # batches per epoch, as the loaders cut them
    test_batches = len(dm.test_dataloader())
    train_s = statistics.mean(train_seconds)
    eval_s = statistics.mean(eval_seconds) if eval_seconds else 0.0
    return {
        "experiment": experiment, "num_params": sum(p.numel() for p in net.parameters()),
        "batch_size": batch, "train_steps": train_rows, "eval_steps": eval_rows,
        "train_step_s_mean": train_s, "eval_step_s_mean": eval_s,
        "train_batches_per_epoch": train_batches, "test_batches": test_batches,
        "epoch_estimate_s": train_s * train_batches + eval_s * test_batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="the directory holding MNIST/raw")
    parser.add_argument("--experiments", default="node_conv_mnist,node_aug_conv_mnist")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.steps < 1 or args.eval_steps < 0 or args.threads < 1:
        raise SystemExit("--steps and --threads must be >= 1, --eval-steps >= 0")
    torch.set_num_threads(args.threads)
    out = {"command": " ".join(["python", "-m", "pcdeq.bench.node_steps", *sys.argv[1:]]), "threads": args.threads,
           "host": platform.processor() or platform.machine(), "torch": torch.__version__,
           "runs": [measure(e, args.data_dir, args.steps, args.eval_steps) for e in args.experiments.split(",")]}
    for run in out["runs"]:
        nfe = statistics.mean(r["nfe"] for r in run["train_steps"])
        bnfe = statistics.mean(r["bnfe"] for r in run["train_steps"])
        print(f"{run['experiment']}: {run['num_params']:,} params, train step {run['train_step_s_mean']:.2f} s "
              f"(NFE {nfe:.1f}, BNFE {bnfe:.1f}), eval step {run['eval_step_s_mean']:.2f} s, "
              f"epoch estimate {run['epoch_estimate_s'] / 60:.1f} min ({run['train_batches_per_epoch']} + "
              f"{run['test_batches']} batches)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
