"""Evaluate a checkpoint on its test set: `python eval.py ckpt_path=<run dir>/checkpoints/last.ckpt`."""

import hydra
from omegaconf import DictConfig

import pcdeq.config  # noqa: F401  (registers the config resolvers)
from pcdeq.pipeline import evaluate, run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    return run_cli(evaluate, cfg).get("test/acc")


if __name__ == "__main__":
    main()
