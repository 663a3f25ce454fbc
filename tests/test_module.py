"""The Lightning module in process (the template's fast_dev_run style) and its per-epoch aggregates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pcdeq.training.metrics import EpochAggregate
from pcdeq.training.pipeline import build_run, fit_and_test
from tests.helpers import compose_train

TINY = {"pcdeq_linear": "8", "pcdeq_conv": "4", "pcdeq_multiconv": "[3,4,5]", "mondeq_fc": "8", "mondeq_conv": "3",
        "mondeq_multitier": "[2,3,4]"}


@pytest.mark.parametrize("model", sorted(TINY))
def test_fast_dev_run_of_every_model(model: str, tmp_path: Path) -> None:
    cfg = compose_train(f"model={model}", f"model.channels={TINY[model]}", "trainer.fast_dev_run=true",
                        "logger=none", "num_threads=1", f"paths.output_dir={tmp_path}")
    run = build_run(cfg)
    before = {k: v.detach().clone() for k, v in run.module.net.state_dict().items() if torch.is_tensor(v)}
    status, fit_metrics, test_metrics, _ = fit_and_test(run)
    assert status == "completed"
    for key in ("train/loss", "train/acc", "train/fwd_iters", "train/bwd_iters", "train/lr", "train/epoch_s"):
        assert math.isfinite(fit_metrics[key]), key
    assert 0.0 <= test_metrics["test/acc"] <= 1.0 and test_metrics["test/fwd_iters"] >= 1
    changed = [k for k, v in before.items() if v.dtype.is_floating_point
               and not torch.equal(v, run.module.net.state_dict()[k])]
    assert changed  # one optimizer step was taken
    if model.startswith("pcdeq"):
        assert "train/cw_bound_max" in fit_metrics  # the certificate is computed on batch 0
        assert fit_metrics["train/cw_uncertified"] == 0.0 and fit_metrics["train/cw_bound_max"] < 1
        projected = [p for n, p in run.module.net.named_parameters() if n.endswith((".g", ".v"))]
        assert projected and all(float(p.detach().min()) >= 0 for p in projected)


def test_epoch_aggregate_matches_hand_computation() -> None:
    mean, top, total = EpochAggregate(["a", "b"], "mean"), EpochAggregate(["a"], "max"), EpochAggregate(["a"], "sum")
    batches = [(0.5, 64), (0.25, 64), (1.0, 32)]
    for v, n in batches:
        mean.update({"a": torch.tensor(v)}, weight=n)
        top.update({"a": v})
        total.update({"a": v})
    mean.update({"b": math.nan})  # non-finite floats are skipped, not averaged in
    assert mean.compute() == pytest.approx({"a": (0.5 * 64 + 0.25 * 64 + 1.0 * 32) / 160})
    assert "b" not in mean.compute() and math.isnan(mean.peek("b"))
    assert top.compute() == {"a": 1.0} and total.compute() == {"a": 1.75}
    mean.reset()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert mean.compute() == {}
    with pytest.raises(KeyError):
        mean.update({"c": 1.0})


@pytest.mark.parametrize("fold_every", [1024, 3])
def test_epoch_aggregate_add_commit_equals_update(monkeypatch, fold_every: int) -> None:
    # add() (host floats, device tensors kept and folded later; with fold_every=3 also folded mid-epoch) then
    # commit() gives what update() gives batch by batch
    monkeypatch.setattr("pcdeq.training.metrics.FOLD_EVERY", fold_every)
    rng = torch.Generator().manual_seed(0)
    for reduce in ("mean", "max", "sum"):
        fast, slow = EpochAggregate(["t", "f"], reduce), EpochAggregate(["t", "f"], reduce)
        for k in range(7):
            batch = {"t": torch.rand((), generator=rng, dtype=torch.float32), "f": float(k % 3) - 0.5}
            if k == 2:
                batch["t"] = batch["t"].reshape(1)  # a one-element tensor counts as its value
            if k == 4:
                batch["f"] = math.inf  # skipped on both paths
            fast.add(batch, weight=10 + k)
            slow.update(batch, weight=10 + k)
        assert fast.peek("t") == pytest.approx(slow.peek("t"), rel=1e-6)  # pending values are seen
        fast.commit()
        assert fast.compute() == pytest.approx(slow.compute(), rel=1e-6)
        fast.reset()
        assert math.isnan(fast.peek("f"))
    with pytest.raises(KeyError, match="not one of"):
        EpochAggregate(["a"], "sum").add({"c": 1.0})
    with pytest.raises(ValueError, match="one number per batch"):  # caught when added, not at the epoch's end
        EpochAggregate(["a"], "sum").add({"a": torch.ones(2)})


def test_third_party_messages_are_silenced_exactly(caplog) -> None:
    import logging
    import warnings

    from pcdeq.training.quiet import silence_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_third_party()
        warnings.warn("Total length of `list` across ranks is zero. Please make sure this was your intention.",
                      UserWarning, stacklevel=1)
        warnings.warn("Total length of `DataLoader` across ranks is zero. Please make sure this was your intention.",
                      UserWarning, stacklevel=1)  # a real empty loader: kept
    assert [str(w.message).split("`")[1] for w in seen] == ["DataLoader"]
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        lightning_log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
                           "(https://pypi.org/project/litlogger/) to enable LitLogger.")
        lightning_log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
