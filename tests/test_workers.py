"""Started twice: two train.py on one run directory, two reproduction workers on one plan, a killed worker.

Real processes throughout, since the behaviour is about processes: the lock is the kernel's, a SIGKILL runs no
cleanup, and the logs checked are the ones a user reads. The oracle for "trained exactly once" is the logs
themselves: each training start logs its run directory once, each epoch one summary line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcdeq.training.runlock import lock_holder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# digits (embedded, offline), a quarter of a second per epoch: the first to lock holds it for seconds, and the
# other, started at the same moment, reaches the lock well within them
LONG_RUN = ["model=pcdeq_linear", "model.channels=8", "trainer.max_epochs=15", "test_every_epoch=false",
            "logger=none", "num_threads=1"]
SPEC = """name: workers
dataset: mnist
seeds: [0, 1]
columns: [test_acc, params, fwd_iters, bwd_iters]
rows:
  - {label: "tanh", experiment: pcdeq_linear_mnist, overrides: [model.activation=tanh]}
  - {label: "sigmoid", experiment: pcdeq_linear_mnist, overrides: [model.activation=sigmoid]}
"""


def _train(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_RUN, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_train_py_on_one_run_directory_one_trains_the_other_stops_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = [_train(run), _train(run)]  # started together: whichever locks first trains
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [err[-2000:] for _, err in outs]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    stderr = outs[loser][1]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert re.search(rf"error: run directory {run} is in use by another process \(host [^,]+, pid "
                     rf"{procs[winner].pid}, started [^)]+\); fix: wait for it to end", errors[0]), errors[0]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed" and res["epochs"] == 15
    assert json.loads((run / "launch.json").read_text())["pid"] == procs[winner].pid
    assert lock_holder(run) is None  # both have ended: nobody holds it


def _files(tmp_path: Path, name: str, overrides: str, spec: str = SPEC) -> tuple[list[str], Path]:
    """A table spec and a profile whose runs live in ``tmp_path/name``: the worker arguments and the root."""
    (tmp_path / "workers.yaml").write_text(spec)
    profile = tmp_path / f"{name}.yaml"
    profile.write_text(f"root: {tmp_path / name / 'runs'}\nout: {tmp_path / name / 'out'}\noverrides: [{overrides}]\n"
                       "channels: {pcdeq_linear: '8'}\n")
    return ["--tables", str(tmp_path / "workers.yaml"), "--profile", str(profile)], tmp_path / name / "runs"


def _worker(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "pcdeq.reproduce", *args], cwd=ROOT, env=ENV, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _starts(text: str) -> list[str]:
    """The run directories whose training started, once per start, from a worker's log."""
    return re.findall(r"\[pcdeq\]\[INFO\] - run directory: (\S+)", text)


def _table(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "pcdeq.aggregate", *args, "--no-plots"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    profile = Path(args[3]).read_text()
    out = Path(re.search(r"out: (\S+)", profile).group(1))  # type: ignore[union-attr]
    return (out / "workers.csv").read_text()


@pytest.mark.slow
def test_two_workers_started_together_share_the_plan_and_give_a_single_workers_table(tmp_path: Path) -> None:
    tiny = "dataset.synthetic=true, 'dataset.synthetic_size=[256,64]', trainer.max_epochs=1"
    args, root = _files(tmp_path, "pair", tiny)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    workers = [_worker(args, logs[0]), _worker(args, logs[1])]
    for w in workers:
        assert w.wait(timeout=900) == 0, [log.read_text()[-3000:] for log in logs]
    texts = [log.read_text() for log in logs]
    assert not any("Traceback" in t for t in texts), texts
    summaries = [re.findall(r"\[reproduce\] worker \S+: (.*)", t) for t in texts]
    assert all(len(s) == 1 for s in summaries), summaries  # one summary line per worker
    starts = _starts(texts[0]) + _starts(texts[1])
    results = sorted(root.rglob("results.json"))
    assert len(results) == 4 and all(json.loads(p.read_text())["status"] == "completed" for p in results)
    assert sorted(starts) == sorted(str(p.parent) for p in results)  # every run trained exactly once
    done = [int(re.match(r"completed (\d+)", s[0]).group(1)) for s in summaries]  # type: ignore[union-attr]
    assert sum(done) == 4 and done == [len(_starts(t)) for t in texts]

    single_args, single_root = _files(tmp_path, "single", tiny)
    alone = subprocess.run([sys.executable, "-m", "pcdeq.reproduce", *single_args], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "completed 4, skipped as done 0, held by another worker 0, failed 0" in alone.stderr
    assert _table(args) == _table(single_args)


@pytest.mark.slow
def test_a_worker_killed_mid_run_leaves_its_run_to_the_next_one_which_resumes_it(tmp_path: Path) -> None:
    one_run = SPEC.replace("seeds: [0, 1]", "seeds: [0]").split('  - {label: "sigmoid"')[0]
    # about twenty batches an epoch: the kill lands after the first epoch's checkpoint, well before the last
    args, root = _files(tmp_path, "kill", "dataset.synthetic=true, 'dataset.synthetic_size=[2560,64]', "
                        "trainer.max_epochs=4", one_run)
    first = _worker(args, tmp_path / "first.log")
    deadline = time.monotonic() + 600
    while not list(root.rglob("last.ckpt")):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its train.py, no cleanup
    first.wait(timeout=60)
    (run,) = {p.parent.parent for p in root.rglob("last.ckpt")}
    assert not (run / "results.json").exists() and lock_holder(run) is None

    second = _worker(args, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    texts = [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]
    assert "Traceback" not in texts[1] and "resuming from" in texts[1]
    epochs = [[int(e) for e in re.findall(r"- epoch (\d+)/4 \|", t)] for t in texts]
    # the second worker went on where the first stopped: no epoch trained twice, none left out after it
    assert epochs[1][0] > 1 and epochs[1] == list(range(epochs[1][0], 5)) and not set(epochs[0]) & set(epochs[1])
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed" and res["epochs"] == 4
    assert texts[1].count("status completed") == 1 and "status completed" not in texts[0]  # trained to the end once
    assert "completed 1, skipped as done 0, held by another worker 0, failed 0" in texts[1]
