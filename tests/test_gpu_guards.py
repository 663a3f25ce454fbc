"""What would break or stall a GPU run, caught on a CPU (issue 21): tensors made without a device, host syncs.

* Device placement: the hot paths run with ``torch.device("meta")`` as the default device while the model and
  data sit on the CPU, so a factory call without an explicit device (``torch.zeros(n)``) makes a meta tensor and
  the next operation with a CPU tensor fails, as a CPU tensor would meet a CUDA one on a GPU.
* Host syncs: :class:`pcdeq.bench.syncs.SyncCounter` counts the operations that make the host wait for the device.
  The budget of a solve is one per residual check the schedule made plus :data:`FINISH_SYNCS` for its final
  statistics; the per-batch metrics, the projection and the solver statistics make none; a training step adds one
  (the divergence check on the loss).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from pcdeq.bench.syncs import SyncCounter
from pcdeq.family import build_net
from pcdeq.solver.stats import _solves_by_direction
from pcdeq.training.pipeline import build_run, fit_and_test

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# every family and architecture at a few channels: the paths are the paper's, the sizes tiny
TINY: dict[tuple[str, str], Any] = {("pcdeq", "linear"): 12, ("pcdeq", "conv"): 4, ("pcdeq", "multiconv"): [2, 3, 4],
                                    ("mondeq", "fc"): 10, ("mondeq", "conv"): 4, ("mondeq", "multitier"): [2, 3, 4]}
FINISH_SYNCS = 3  # per solve, pcdeq.solver.stopping.finish_stats: the residual mean, its max and the count above tol
MODULE_HOOKS = ("training_step", "validation_step", "test_step", "on_train_batch_start", "on_train_batch_end",
                "on_train_epoch_start", "on_train_epoch_end", "on_validation_epoch_end", "on_test_epoch_end")
CALLBACK_HOOKS = ("on_after_backward", "on_train_batch_end", "on_train_end", "on_train_epoch_end",
                  "on_validation_epoch_end", "on_test_epoch_end")


@contextmanager
def meta_default_device() -> Iterator[None]:
    """Tensors made without a device inside the block land on "meta" (and then clash with the CPU ones)."""
    with torch.device("meta"):
        yield


def on_meta(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with meta as the default device."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with meta_default_device():
            return fn(*args, **kwargs)

    return run


def on_host(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with the CPU as the default device again (code that is not the project's)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return run


def tiny_net(family: str, arch: str) -> Any:
    torch.manual_seed(0)
    return build_net(family, arch, "mnist", channels=TINY[(family, arch)])


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g)


# ---------------------------------------------------------------- device placement


def test_the_meta_guard_catches_a_tensor_made_without_a_device() -> None:
    x = torch.ones(3)
    with meta_default_device(), pytest.raises((RuntimeError, NotImplementedError)):
        x + torch.zeros(3)  # what a GPU run does with a CPU tensor in the loop: it fails
    with meta_default_device():
        assert (x + torch.zeros(3, device=x.device)).device.type == "cpu"


@pytest.mark.parametrize("family,arch", sorted(TINY))
def test_every_hot_path_places_its_tensors(family: str, arch: str) -> None:
    net = tiny_net(family, arch)
    x, y = batch()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    with meta_default_device():
        net.train()
        net.on_train_batch_start(x, 0, 10)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()  # the implicit backward solve
        optimizer.step()
        net.project_()
        stats, cert, epoch = net.solver_stats(), net.certificate(), net.epoch_metrics()
        net.eval()
        with torch.inference_mode():
            evaluated = net(x)
    assert logits.device.type == evaluated.device.type == "cpu" and torch.isfinite(loss)
    assert stats["forward"]["iters"] >= 1 and stats["backward"]["iters"] >= 1
    assert all(isinstance(v, float) for v in (*cert.values(), *epoch.values()))


def _compose(tmp_path: Path, *overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=["dataset=mnist", "dataset.synthetic=true", "dataset.synthetic_size=[16,8]",
                                           "dataset.batch_size=8", "dataset.val_size=8", "trainer.max_epochs=1",
                                           "logger=none", "num_threads=1", "callbacks=debug",
                                           "certificate_every_n_steps=1", f"paths.output_dir={tmp_path}",
                                           *overrides])


@pytest.mark.parametrize("model,channels", [("pcdeq_multiconv", "[2,3,4]"), ("mondeq_fc", "10")])
def test_the_lightning_module_and_callbacks_place_their_tensors(model: str, channels: str, tmp_path: Path) -> None:
    cfg = _compose(tmp_path, f"model={model}", f"model.channels={channels}")
    run = build_run(cfg)
    module = run.module
    for name in MODULE_HOOKS:  # the project's hooks; Lightning's own loop runs as usual around them
        setattr(module, name, on_meta(getattr(module, name)))
    module.net.project_ = on_meta(module.net.project_)  # the optimizer is torch's; the projection after it is ours
    module.log = on_host(module.log)  # Lightning's logging is Lightning's: it runs on the real default device
    callbacks = [c for c in run.trainer.callbacks if type(c).__module__.startswith("pcdeq")]  # type: ignore[attr-defined]
    assert callbacks, "callbacks=debug adds the project's SanityCheck"
    for cb in callbacks:
        for name in CALLBACK_HOOKS:
            if hasattr(cb, name):
                setattr(cb, name, on_meta(getattr(cb, name)))
    status, fit_metrics, test_metrics, _ = fit_and_test(run)
    assert status == "completed"
    assert fit_metrics["train/fwd_iters"] >= 1 and "val/acc" in fit_metrics and "test/acc" in test_metrics


# ---------------------------------------------------------------- host syncs


def solve_budget(net: Any, direction: str) -> tuple[int, int]:
    """(residual checks made, solves) of the last solves in ``direction``."""
    solves = _solves_by_direction(net).get(direction, [])
    return sum(len(s.history) for s in solves), len(solves)


@pytest.mark.parametrize("family,arch", sorted(TINY))
def test_solver_syncs_stay_within_one_per_residual_check(family: str, arch: str) -> None:
    net = tiny_net(family, arch)
    x, y = batch()
    net.train()
    net.on_train_batch_start(x, 0, 10)
    with SyncCounter() as forward:
        logits = net(x)
    loss = F.cross_entropy(logits, y)
    with SyncCounter() as backward:
        loss.backward()
    for counter, direction in ((forward, "forward"), (backward, "backward")):
        checks, solves = solve_budget(net, direction)
        assert checks >= solves >= 1
        # the counter sees the checks (not a vacuous bound) and nothing beyond the budget
        assert checks <= counter.total <= checks + FINISH_SYNCS * solves, (direction, dict(counter.counts))
    net.eval()
    # no_grad, not inference_mode: a TorchDispatchMode does not see operations on inference tensors
    with torch.no_grad(), SyncCounter() as evaluation:
        net(x)
    checks, solves = solve_budget(net, "forward")
    assert checks <= evaluation.total <= checks + FINISH_SYNCS * solves


@pytest.mark.parametrize("family,arch", sorted(TINY))
def test_projection_statistics_and_per_batch_metrics_make_no_sync(family: str, arch: str, tmp_path: Path) -> None:
    model = f"{family}_{arch}"
    channels = str(TINY[(family, arch)]).replace(" ", "")
    run = build_run(_compose(tmp_path, f"model={model}", f"model.channels={channels}", "callbacks=default",
                               "certificate_every_n_steps=20"))
    module, net = run.module, run.module.net
    x, y = batch(8)
    module._trainer = SimpleNamespace(should_stop=False, progress_bar_callback=None, num_training_batches=2)  # type: ignore[assignment]
    module.train()
    module.on_train_batch_start((x, y), 1)
    with SyncCounter() as step:
        loss = module.training_step((x, y), 1)  # batch 1: no certificate (it runs on batch 0 of every 20)
    loss.backward()
    checks, solves = solve_budget(net, "forward")
    assert step.total <= checks + FINISH_SYNCS * solves + 1  # + 1: the divergence check on the loss
    with SyncCounter() as rest:
        net.project_()
        net.solver_stats()
        module._record("train", loss.detach(), loss.detach(), 8, directions=("forward", "backward"))
        module._aggregate("train", "mean").commit()
    assert rest.total == 0, dict(rest.counts)


def test_the_sync_counter_sees_item_bool_and_data_dependent_shapes() -> None:
    t = torch.tensor([0.0, 1.0, 2.0])
    with SyncCounter() as c:
        t.sum().item()
        float(t.max())
        bool(t.min() > 0)
        t.nonzero()
        t[t > 0]  # boolean masking: a data-dependent shape
        (t * 2).sum()  # no sync
    assert c.total == 5, dict(c.counts)
