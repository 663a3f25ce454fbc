"""Train one configuration: `python train.py model=pcdeq_conv dataset=cifar10` (see conf/ and the README)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pcdeq.training.pipeline import run_cli, train  # also registers the config schemas and resolvers
from pcdeq.training.validate import check_command_line


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = run_cli(train, cfg)
    return results.get("test/acc")  # the figure a Hydra sweeper would optimise


if __name__ == "__main__":
    # a bad value (of any sweep job) fails before Hydra starts
    check_command_line(sys.argv[1:], "train", Path(__file__).parent / "conf")
    main()
