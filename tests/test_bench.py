"""``python -m pcdeq.bench`` (`make bench`) in its quick mode: the JSON it writes, on small networks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import pytest

from pcdeq.bench import cli

# tiny networks: a tenth of the paper's widths, batch 8, one repetition
SMALL = ["--quick", "--width-scale", "0.1", "--batch", "8", "--threads", "1"]
STEP_FIELDS = {"train_ms", "eval_ms", "train_samples_per_s", "eval_samples_per_s", "fwd_iters", "bwd_iters",
               "eval_fwd_iters", "fwd_iters_per_block", "bwd_iters_per_block", "saved_for_backward_mb"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return cli


def run(bench: ModuleType, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    returned = bench.main([*SMALL, "--json", str(out), *args])
    written = json.loads(out.read_text())
    assert written["archs"].keys() == returned["archs"].keys()
    return written


def test_quick_run_writes_every_figure(bench: ModuleType, tmp_path: Path) -> None:
    res = run(bench, tmp_path, "--archs", "pcdeq_linear_mnist,pcdeq_conv_mnist", "--plain")
    assert res["meta"]["command"].startswith("python -m pcdeq.bench --quick")
    assert set(res["archs"]) == {"pcdeq_linear_mnist", "pcdeq_conv_mnist"}
    for name, r in res["archs"].items():
        assert r["batch"] == 8 and r["repeats"] == 1
        for variant in ("best", "plain"):
            v = r["variants"][variant]
            assert STEP_FIELDS <= v.keys(), name
            assert v["train_ms"] > 0 and v["eval_ms"] > 0 and v["saved_for_backward_mb"] > 0
            # the iteration counts are the solver's own statistics of the timed steps
            assert v["fwd_iters"] == v["solver_stats_train"]["forward"]["iters"]
            assert v["bwd_iters"] == v["solver_stats_train"]["backward"]["iters"]
            assert v["eval_fwd_iters"] == v["solver_stats_eval"]["forward"]["iters"]
            assert v["fwd_iters"] >= 1 and v["bwd_iters"] >= 1
            # host syncs of one step: at least one residual check per solve, forward and backward
            assert v["syncs_train"] >= 2 and v["syncs_eval"] >= 1
        floor = r["floor"]
        assert all(u > 0 for u in floor["unit_ms_per_block"]) and floor["train_ratio"] > 0
        p = r["plain_vs_best"]
        assert p["train_ratio"] == pytest.approx(r["variants"]["plain"]["train_ms"] / r["variants"]["best"]["train_ms"])
        assert r["reference"] is None


def test_forced_iterations_and_the_floor_formula(bench: ModuleType, tmp_path: Path) -> None:
    res = run(bench, tmp_path, "--archs", "pcdeq_multiconv_mnist,mondeq_fc_mnist", "--tol", "0", "--max-iter", "3")
    for name, r in res["archs"].items():
        best = r["variants"]["best"]
        blocks = 3 if name.startswith("pcdeq_multiconv") else 1
        assert best["fwd_iters_per_block"] == [3] * blocks and best["bwd_iters_per_block"] == [3] * blocks, name
        assert best["eval_fwd_iters_per_block"] == [3] * blocks
        floor = r["floor"]
        assert floor["train_floor_ms"] == pytest.approx(sum(u * 7 for u in floor["unit_ms_per_block"]))
        assert floor["eval_floor_ms"] == pytest.approx(sum(u * 4 for u in floor["unit_ms_per_block"]))
    assert "resolvent" in res["archs"]["mondeq_fc_mnist"]["floor"]["unit"]


@pytest.mark.skipif(not os.environ.get("PCDEQ_REFERENCE"), reason="set PCDEQ_REFERENCE to the authors' checkout")
def test_reference_agrees_and_is_timed(bench: ModuleType, tmp_path: Path) -> None:
    res = run(bench, tmp_path, "--archs", "pcdeq_linear_mnist,pcdeq_multiconv_mnist,mondeq_fc_mnist",
              "--reference", os.environ["PCDEQ_REFERENCE"])
    for name in ("pcdeq_linear_mnist", "pcdeq_multiconv_mnist"):
        ref = res["archs"][name]["reference"]
        assert ref["passed"] and ref["max_fixed_point_diff"] <= 1e-4 and ref["grad_rel_err"] <= 1e-3, name
        assert ref["train_ratio"] > 0 and ref["eval_ratio"] > 0
        # same weights, same batch: the same number of iterations as ours
        ours, theirs = res["archs"][name]["variants"]["best"], res["archs"][name]["variants"]["reference"]
        assert theirs["fwd_iters_per_block"] == ours["fwd_iters_per_block"]
    assert res["archs"]["mondeq_fc_mnist"]["reference"] is None


@pytest.mark.slow
def test_memory_and_epoch(bench: ModuleType, tmp_path: Path) -> None:
    res = run(bench, tmp_path, "--archs", "pcdeq_linear_mnist", "--memory", "--memory-arch", "pcdeq_linear_mnist",
              "--epoch", "--epoch-archs", "pcdeq_linear_mnist")
    mem = res["memory"]
    assert mem["iters"] == [2, 4]
    implicit = [p["saved_for_backward_mb"] for p in mem["implicit"]]
    unrolled = [p["saved_for_backward_mb"] for p in mem["unrolled"]]
    assert implicit[0] == pytest.approx(implicit[1])  # flat
    assert unrolled[1] > unrolled[0] > implicit[0]  # grows with the iterations
    assert [p["fwd_iters"] for p in mem["unrolled"]] == [[2], [4]]
    # the step's own peak, not one inherited from the parent process (Linux keeps ru_maxrss across exec)
    assert all(0 <= p["peak_rss_growth_mb"] < 500 for p in mem["implicit"] + mem["unrolled"])
    epoch = res["epoch"]["pcdeq_linear_mnist"]
    assert epoch["batches"] == 2 and epoch["epoch_s"] > 0 and epoch["bare_epoch_s"] > 0 and epoch["steps_s"] > 0
    assert epoch["minimal_epoch_s"] > 0
    assert epoch["lightning_floor_pct"] == pytest.approx((epoch["minimal_epoch_s"] / epoch["bare_epoch_s"] - 1) * 100)
    assert epoch["module_pct"] == pytest.approx((epoch["epoch_s"] / epoch["minimal_epoch_s"] - 1) * 100)


def test_switch_variant_times_one_setting_beside_the_default(bench: ModuleType, tmp_path: Path) -> None:
    res = run(bench, tmp_path, "--archs", "pcdeq_conv_mnist", "--switch", "skip_zero_product=false")
    r = res["archs"]["pcdeq_conv_mnist"]
    assert r["switch"] == {"skip_zero_product": False}
    switched, best = r["variants"]["switched"], r["variants"]["best"]
    # the switch is exact: the same iterates, so the same iteration counts on the same weights and batch
    assert (switched["fwd_iters"], switched["bwd_iters"]) == (best["fwd_iters"], best["bwd_iters"])
    s = r["switched_vs_best"]
    assert s["train_ratio"] == pytest.approx(switched["train_ms"] / best["train_ms"])
    assert r["plain_vs_best"] is None


@pytest.mark.parametrize("item,message", [("nope=1", "valid keys"), ("fwd_tol", "KEY=VALUE"),
                                          ("check=sometimes", "valid choices: prior")])
def test_switch_rejects_what_is_not_a_solver_setting(bench: ModuleType, item: str, message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--switch", item])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_switch_values_are_typed(bench: ModuleType) -> None:
    changes = bench.parse_switches(["solver.inplace=false", "check_every=3", "fwd_tol=1e-3", "check=periodic"])
    assert changes == {"inplace": False, "check_every": 3, "fwd_tol": 1e-3, "check": "periodic"}


@pytest.mark.parametrize("argv,message", [(["--epoch-repeats", "0"], "--epoch-repeats must be at least 1"),
                                          (["--warmup", "0"], "--warmup must be at least 1")])
def test_bad_repetition_counts_exit_2(bench: ModuleType, argv: list[str], message: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
