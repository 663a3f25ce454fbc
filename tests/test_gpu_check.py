"""``make gpu-check`` (``python -m pcdeq.bench.gpu_check``): its refusals, and a dry run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pcdeq.bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "make gpu-check DEVICE=cpu" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [(["--stages", "bench,nope"], "--stages nope: unknown"),
                                          (["--reference", "/nonexistent"], "no networks.py there")])
def test_bad_arguments_exit_2(argv: list[str], message: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_stages_are_the_issues_list(tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--device", "cpu", "--quick", "--data-dir", str(tmp_path)])
    stages = {s.name: s for s in gpu_check.stages(args, tmp_path)}
    assert list(stages) == ["tests", "bench", "switches", "epochs"]
    assert stages["tests"].env == {"PCDEQ_TEST_DEVICE": "cpu"}
    switches = [" ".join(c) for c in stages["switches"].commands]
    for switch in ("precision=mixed", "compile=true", "model.channels_last=false", "--tf32"):
        assert any(switch in c for c in switches), switch
    epochs = stages["epochs"].commands
    assert len(epochs) == len(gpu_check.MNIST_EXPERIMENTS)
    assert all("dataset.synthetic=true" in c for c in epochs)  # no MNIST under tmp_path
    assert sum(s.timeout_s for s in stages.values()) <= gpu_check.BUDGET_S  # under 8 minutes in all


@pytest.mark.slow
def test_dry_run_on_the_cpu_writes_every_file_with_its_header(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--stages", "bench,epochs",
                           "--data-dir", str(tmp_path)]) == 0
    for name in ("bench", "epochs"):
        lines = (out / f"gpu_{name}.txt").read_text().splitlines()
        assert lines[0].startswith("$ python -m pcdeq.bench.gpu_check --device cpu")
        assert lines[1].startswith("# device: cpu:") and lines[2].startswith("# stage: ")
    assert json.loads((out / "gpu_bench.json").read_text())["meta"]["device"] == "cpu"
    summary = (out / "gpu_epochs.txt").read_text()
    assert all(f"{exp:<26} completed" in summary for exp in gpu_check.MNIST_EXPERIMENTS)
