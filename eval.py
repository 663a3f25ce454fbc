"""Evaluate a checkpoint on its test set: `python eval.py ckpt_path=<run dir>/checkpoints/last.ckpt`."""

import hydra
from omegaconf import DictConfig

from pcdeq.training.pipeline import evaluate, run_cli  # also registers the config schemas and resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return run_cli(evaluate, cfg).get("test/acc")


if __name__ == "__main__":
    main()
