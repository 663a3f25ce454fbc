"""The solver paths on an accelerator against the CPU (issue 21; run by ``make gpu-check``).

The device is ``$PCDEQ_TEST_DEVICE`` (default ``cuda``); without it every test here is skipped. ``make gpu-check
DEVICE=cpu`` runs them with the CPU standing in for the device, which proves the tests themselves run (the
comparisons are then CPU against CPU, trivially equal).

* forward and backward of every family and architecture on the device equal the CPU's, same weights and batch;
* a float64 gradient check of the implicit backward on the device (finite differences as the oracle);
* the forward solve under ``torch.cuda.set_sync_debug_mode`` (CUDA): the synchronisations it reports stay within
  the budget :mod:`tests.test_gpu_guards` pins on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pcdeq.bench.syncs import SyncCounter
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.family import build_net, get_family
from pcdeq.solver.config import SolverConfig
from pcdeq.solver.stats import _solves_by_direction

DEVICE = torch.device(os.environ.get("PCDEQ_TEST_DEVICE", "cuda"))
FINISH_SYNCS = 3  # as in tests/test_gpu_guards.py: a solve's final statistics
TINY: dict[tuple[str, str], Any] = {("pcdeq", "linear"): 12, ("pcdeq", "conv"): 4, ("pcdeq", "multiconv"): [2, 3, 4],
                                    ("mondeq", "fc"): 10, ("mondeq", "conv"): 4, ("mondeq", "multitier"): [2, 3, 4]}
# float32 on both sides, different kernels: the fixed points agree to about the solver tolerance, not to rounding
TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu"


pytestmark = pytest.mark.skipif(not _available(DEVICE), reason=f"{DEVICE} not available (PCDEQ_TEST_DEVICE)")


def _step(net: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    net.train()
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.detach() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,arch", sorted(TINY))
def test_forward_and_backward_on_the_device_equal_the_cpu(family: str, arch: str) -> None:
    torch.manual_seed(0)
    # tight tolerances: both sides stop at their own rounding, so the comparison measures the kernels only
    solver = dataclasses.replace(get_family(family).default_solver, fwd_tol=1e-6, bwd_tol=1e-6, fwd_max_iter=500,
                                 bwd_max_iter=500, check="every", alpha_tuning=False)
    cpu = build_net(family, arch, "mnist", channels=TINY[(family, arch)], solver=solver)
    dev = copy.deepcopy(cpu).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 1, 28, 28, generator=g), torch.randint(10, (4,), generator=g)
    logits_cpu, grads_cpu = _step(cpu, x, y)
    logits_dev, grads_dev = _step(dev, x.to(DEVICE), y.to(DEVICE))
    torch.testing.assert_close(logits_dev.cpu(), logits_cpu, **TOLERANCE)
    assert grads_dev.keys() == grads_cpu.keys() and grads_cpu
    for name, grad in grads_cpu.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(grads_dev[name].cpu() / scale, grad / scale, **TOLERANCE, msg=name)


def test_float64_gradient_check_on_the_device() -> None:
    torch.manual_seed(0)
    solver = SolverConfig(fwd_tol=1e-13, bwd_tol=1e-13, fwd_max_iter=5000, bwd_max_iter=5000, check="every")
    layer = PcDEQLayer(3, "dense", "tanh", solver=solver).double().to(DEVICE)
    x = torch.empty(2, 3, dtype=torch.float64, device=DEVICE).uniform_(-0.6, 0.4).requires_grad_()
    g = layer.W.g.detach().clone().requires_grad_()
    v = layer.W.v.detach().clone().add_(0.05).requires_grad_()  # away from 0: finite differences stay >= 0

    def fn(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"W.g": g, "W.v": v}, (x,))

    assert torch.autograd.gradcheck(fn, (x, g, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family,arch", [("pcdeq", "conv"), ("mondeq", "fc")])
def test_solver_syncs_on_the_device_stay_within_the_budget(family: str, arch: str) -> None:
    torch.manual_seed(0)
    net = build_net(family, arch, "mnist", channels=TINY[(family, arch)]).to(DEVICE)
    x = torch.rand(4, 1, 28, 28, device=DEVICE)
    net.train()
    net(x)  # warm-up: the check schedule learns its counts from the previous solve
    with SyncCounter() as counter, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            net(x)
        finally:
            if DEVICE.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    solves = _solves_by_direction(net)["forward"]
    checks = sum(len(s.history) for s in solves)
    budget = checks + FINISH_SYNCS * len(solves)
    assert checks <= counter.total <= budget, dict(counter.counts)
    if DEVICE.type == "cuda":  # CUDA's own account of the synchronisations agrees with the budget
        reported = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(reported) <= budget, [str(w.message) for w in reported[:5]]
