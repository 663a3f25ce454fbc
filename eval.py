"""Evaluate a checkpoint on its test set: `python eval.py ckpt_path=<run dir>/checkpoints/last.ckpt`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pcdeq.training.pipeline import evaluate, run_cli  # also registers the config schemas and resolvers
from pcdeq.training.validate import check_command_line


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return run_cli(evaluate, cfg).get("test/acc")


if __name__ == "__main__":
    # a bad value fails before Hydra makes a run directory
    check_command_line(sys.argv[1:], "eval", Path(__file__).parent / "conf")
    main()
