"""Startup validation (pcdeq.training.validate): every declared range, the rules between keys, the outputs.

In process and fast; tests/test_train.py runs a battery of the same mistakes through the train.py entry point
(a few of them in a real `python train.py` process).
"""

from __future__ import annotations

import errno
import math
import re
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from pcdeq.errors import CheckpointError, ConfigError, OutputError
from pcdeq.training import validate
from pcdeq.training.validate import (
    EVAL_GROUPS,
    TRAIN_GROUPS,
    _override_key,
    check_value,
    check_writable_dir,
    schema_rules,
    validate_overrides,
    validate_train,
)
from tests.helpers import CONF, compose_train

RULES = {**schema_rules(TRAIN_GROUPS), **schema_rules(EVAL_GROUPS)}
# The key classes the startup check must cover (the list); each must have a declared rule.
REQUIRED = [
    "optim.lr", "optim.weight_decay", "optim.betas", "optim.scheduler.milestones", "optim.scheduler.gamma",
    "optim.scheduler.step_size", "optim.scheduler.max_lr", "optim.scheduler.up_epochs", "optim.scheduler.beta1",
    "dataset.batch_size", "dataset.eval_batch_size", "dataset.val_size", "dataset.num_workers",
    "dataset.synthetic_size", "trainer.max_epochs", "trainer.limit_train_batches", "trainer.limit_val_batches",
    "trainer.devices", "trainer.accumulate_grad_batches", "trainer.check_val_every_n_epoch",
    "trainer.log_every_n_steps", "trainer.gradient_clip_val", "solver.fwd_tol", "solver.bwd_tol",
    "solver.fwd_max_iter", "solver.bwd_max_iter", "solver.alpha", "num_threads", "seed", "optim.name",
    "optim.scheduler.name", "solver.stop_mode", "batch_size", "num_workers",
]


def _parse(text: str):
    return OverridesParser.create().parse_overrides([f"k={text}"])[0].value()


def _bad_values(rule) -> list:
    """Values outside the rule: just past each finite end of the interval, a word, a wrong choice."""
    if rule.choices:
        return ["nope", 3]
    iv = rule.interval
    bad: list = [] if object in rule.kinds else ["abc"]  # an open type (devices: "auto", [0,1]) takes words
    if not math.isinf(iv.low):
        bad.append(int(iv.low) - 1 if iv.low_closed else iv.low)  # ints below a closed end; the open end itself
    if not math.isinf(iv.high):
        bad.append(iv.high + 1 if iv.high_closed else iv.high)
    bad = [b for b in bad if b not in rule.special]
    return [[b] * (rule.length or 1) if rule.is_list else b for b in bad]


def test_every_required_key_has_a_declared_rule() -> None:
    assert not [k for k in REQUIRED if k not in RULES]


@pytest.mark.parametrize("key", sorted(RULES))
def test_each_rule_accepts_its_example_and_rejects_bad_values(key: str) -> None:
    rule = RULES[key]
    check_value(rule, _parse(rule.example))  # the example shown in messages is itself valid
    for bad in _bad_values(rule):
        with pytest.raises(ConfigError) as err:
            check_value(rule, bad)
        msg = str(err.value)
        # one line naming the key and the value, the valid values and an example
        assert "\n" not in msg and msg.startswith(f"{key}=") and "; valid: " in msg and f"e.g. {key}=" in msg


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=-0.1", "optim.lr=-0.1: out of range; valid: a number > 0, e.g. optim.lr=5e-4"),
    ("optim.lr=0", "optim.lr=0: out of range"),
    ("optim.weight_decay=-1e-2", "optim.weight_decay=-0.01: out of range; valid: a number >= 0"),
    ("optim.betas=[0.9,1.2]", "optim.betas=[0.9,1.2]: 1.2 is not valid; valid: a list of 2 values, each a number in"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]: needs 2 values"),
    ("dataset.batch_size=0", "dataset.batch_size=0: out of range; valid: an integer >= 1, e.g. dataset.batch_size=64"),
    ("dataset.batch_size=abc", "dataset.batch_size=abc: not an integer"),
    ("dataset.batch_size=6.5", "dataset.batch_size=6.5: not an integer"),
    ("dataset.num_workers=-1", "dataset.num_workers=-1: out of range; valid: an integer >= 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: out of range"),
    ("trainer.limit_train_batches=0", "valid: an integer >= 1 or a fraction in (0, 1]"),
    ("trainer.devices=0", "trainer.devices=0: out of range; valid: an integer >= 1 or -1"),
    ("trainer.gradient_clip_val=-1.0", "trainer.gradient_clip_val=-1.0: out of range"),
    ("solver.fwd_tol=1e-4,-0.5", "solver.fwd_tol=-0.5: out of range; valid: a number in [0, 1), "
     "e.g. solver.fwd_tol=1e-4"),
    ("solver.fwd_tol=1", "solver.fwd_tol=1: out of range; valid: a number in [0, 1)"),
    ("solver.bwd_max_iter=0", "solver.bwd_max_iter=0: out of range; valid: an integer >= 1"),
    ("solver.alpha=-1", "solver.alpha=-1: out of range"),
    ("solver.stop_mode=all", "solver.stop_mode=all: unknown choice; valid: one of sample, batch"),
    ("solver.mondeq_w=fft", "solver.mondeq_w=fft: unknown choice; valid: one of frequency, spatial, "
     "e.g. solver.mondeq_w=frequency"),
    ("optim.name=rmsprop", "optim.name=rmsprop: unknown choice; valid: one of adamw, adam, sgd, e.g. optim.name=adamw"),
    ("optim.scheduler.milestones=[0]", "optim.scheduler.milestones=[0]: 0 is not valid"),
    ("num_threads=0", "num_threads=0: out of range"),
    ("seed=abc", "seed=abc: not an integer"),
    ("certificate_every_n_steps=-5", "certificate_every_n_steps=-5: out of range"),
    ("+trainer.max_steps=0", "trainer.max_steps=0: out of range; valid: an integer >= 1 or -1"),
    ("trainer.max_epochs=range(-1,3)", "trainer.max_epochs=-1: out of range"),  # every value of a sweep
])
def test_command_line_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate_overrides([override])
    assert str(err.value).startswith(_override_key(override).split("=")[0] + "=")


def test_command_line_leaves_good_values_and_other_keys_alone() -> None:
    validate_overrides(["-m", "optim.lr=1e-3,2e-3", "dataset.batch_size=32", "trainer.limit_train_batches=0.5",
                        "trainer.devices=auto", "trainer.fast_dev_run=true", "+trainer.max_steps=-1",
                        "optim.scheduler.milestones=[10,20]", "dataset.eval_batch_size=null", "seed=3",
                        "hydra.run.dir=/x", "model.activation=sigmoid", "+trainer.profiler=simple",
                        "optim.lr=${optim.scheduler.max_lr}", "optim.lr=interval(1e-4,1e-2)", "~optim.betas"])
    validate_overrides(["batch_size=128", "num_workers=2"], task="eval")
    with pytest.raises(ConfigError, match="^batch_size=0: out of range"):
        validate_overrides(["batch_size=0"], task="eval")


def test_group_choices_on_the_command_line() -> None:
    validate_overrides(["model=pcdeq_linear", "dataset=mnist,cifar10", "hydra/launcher=joblib"], conf_dir=CONF)
    with pytest.raises(ConfigError, match=r"^dataset=cifar100: unknown choice \(no conf/dataset/cifar100.yaml\); "
                                          r"valid: one of cifar10, cifar10_aug, digits, mnist, svhn"):
        validate_overrides(["-m", "dataset=mnist,cifar100"], conf_dir=CONF)
    # a run that extends the search path may pick configs from elsewhere: left to Hydra
    validate_overrides(["hydra.searchpath=[file:///x]", "model=elsewhere"], conf_dir=CONF)


# ---------------------------------------------------------------- the composed config


def _config(tmp_path: Path, *overrides: str) -> dict:
    cfg = compose_train(*overrides, f"paths.output_dir={tmp_path / 'run'}")
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_table_row_passes_validation(tmp_path: Path, experiment: str) -> None:
    # every shipped protocol is consistent (schedules inside the epochs, sizes valid), also without overrides
    validate_train(_config(tmp_path, f"experiment={experiment}"), overrides=[f"experiment={experiment}"])


def test_default_config_passes_and_creates_nothing(tmp_path: Path) -> None:
    validate_train(_config(tmp_path), overrides=[])
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the run directory


def test_schedule_past_the_last_epoch(tmp_path: Path) -> None:
    config = _config(tmp_path, "optim.scheduler.milestones=[50]")
    with pytest.raises(ConfigError, match=r"^optim.scheduler.milestones=\[50\]: past the last epoch "
                                          r"\(trainer.max_epochs=30\); valid: epochs in \[1, 29\], "
                                          r"e.g. optim.scheduler.milestones=\[22\]"):
        validate_train(config, overrides=["optim.scheduler.milestones=[50]"])
    # a protocol set in a file but contradicted by max_epochs there: a mistake too
    with pytest.raises(ConfigError, match="past the last epoch"):
        validate_train(_config(tmp_path, "trainer.max_epochs=20"), overrides=["experiment=x"])
    # shortening a protocol's run on the command line is a smoke run: the schedule is cut, with one info line
    validate_train(_config(tmp_path, "trainer.max_epochs=3"), overrides=["trainer.max_epochs=3"])
    step = _config(tmp_path, "optim=adam", "optim.scheduler.name=step", "optim.scheduler.step_size=40")
    with pytest.raises(ConfigError, match=r"^optim.scheduler.step_size=40: past the last epoch"):
        validate_train(step, overrides=["optim.scheduler.step_size=40"])


def test_schedule_needs_its_parameters(tmp_path: Path) -> None:
    config = _config(tmp_path, "optim.scheduler.name=step", "optim.scheduler.step_size=null")
    with pytest.raises(ConfigError, match=r"^optim.scheduler.step_size=null: required by optim.scheduler.name=step; "
                                          r"valid: an integer >= 1, e.g. optim.scheduler.step_size=10"):
        validate_train(config, overrides=[])
    onecycle = _config(tmp_path, "optim.scheduler.name=onecycle", "optim.scheduler.max_lr=1e-2")
    with pytest.raises(ConfigError, match=r"^optim.scheduler.up_epochs=null: required by"):
        validate_train(onecycle, overrides=[])


def test_values_from_config_files_are_checked(tmp_path: Path) -> None:
    # a bad value may come from a config file, not the command line: the composed config is checked too
    config = _config(tmp_path)
    config["trainer"]["accumulate_grad_batches"] = 0
    with pytest.raises(ConfigError, match="^trainer.accumulate_grad_batches=0: out of range"):
        validate_train(config, overrides=[])
    config = _config(tmp_path)
    config["solver"]["fwd_max_iter"] = 2.5
    with pytest.raises(ConfigError, match="^solver.fwd_max_iter=2.5: not an integer"):
        validate_train(config, overrides=[])


def test_validation_split_must_leave_training_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^dataset.val_size=1437: leaves no training data \(digits has 1437 "
                                          r"training images\); valid: an integer in \[0, 1436\]"):
        validate_train(_config(tmp_path, "dataset.val_size=1437"), overrides=[])
    with pytest.raises(ConfigError, match="synthetic training images"):
        validate_train(_config(tmp_path, "dataset=mnist", "dataset.synthetic=true",
                               "dataset.synthetic_size=[100,10]", "dataset.val_size=100"), overrides=[])
    validate_train(_config(tmp_path, "dataset.val_size=1436"), overrides=[])


def test_model_and_solver_choices_are_checked_before_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown activation 'relu'"):
        validate_train(_config(tmp_path, "model.activation=relu"), overrides=[])
    with pytest.raises(ConfigError, match="unknown solver"):
        validate_train(_config(tmp_path, "solver.fwd_solver=newton"), overrides=[])


def test_resume_checkpoint_is_checked_before_data(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        validate_train(_config(tmp_path, f"ckpt_path={tmp_path / 'none.ckpt'}"), overrides=[])


# ---------------------------------------------------------------- outputs


def test_output_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"cannot create the run directory .*afile/run: .*afile is a file, not a "
                                          r"directory; fix: pass hydra.run.dir="):
        check_writable_dir(tmp_path / "afile" / "run", "run directory", validate.RUN_DIR_FIX)
    config = _config(tmp_path)
    config["paths"]["output_dir"] = str(tmp_path / "afile" / "run")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        validate_train(config, overrides=[])


def test_output_dir_that_cannot_be_written(tmp_path: Path, monkeypatch) -> None:
    # permission bits mean nothing to root, so the probe write is made to fail as a full or read-only disk would
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(validate.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"cannot write the run directory .*/logs/run: Read-only file system in "):
        check_writable_dir(tmp_path / "logs" / "run", "run directory", validate.RUN_DIR_FIX)
    assert not (tmp_path / "logs").exists()  # nothing created
