"""Compare the convergence certificate with the spectral radius of the Jacobian on a trained linear pcDEQ.

    python scripts/certificate_check.py <run dir>/checkpoints/last.ckpt [--data-dir data] [--n 10000]

For each MNIST test image: the certificate (pcdeq.families.pcdeq.certificate, 10 power steps), the plain
Collatz-Wielandt ratio with u = z*, and rho(J) of the dense float64 Jacobian J = diag(sigma'(W z* + x~)) W by power
iteration (500 steps, checked against numpy's eigenvalues). Prints the largest and mean of each and the ratio
certificate / rho per image. Linear (dense) models only: their Jacobian is a small dense matrix.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torchvision import datasets

from pcdeq.families.pcdeq.certificate import collatz_wielandt_bound
from pcdeq.families.pcdeq.layer import PcDEQLayer
from pcdeq.training.module import EquilibriumModule


def dense_jacobians(layer: PcDEQLayer, z: torch.Tensor, x_inj: torch.Tensor) -> torch.Tensor:
    """J_b = diag(sigma'(W z_b + x~_b)) W, float64, from sigma' by autograd (any activation)."""
    w = layer.W.weight().detach().double()
    pre = (z.double() @ w.T + x_inj.double()).requires_grad_()
    (deriv,) = torch.autograd.grad(layer.act.fn(pre).sum(), pre)
    return deriv[:, :, None] * w[None]


def power_rho(jac: torch.Tensor, steps: int = 500) -> torch.Tensor:
    u = torch.ones(jac.shape[0], jac.shape[1], 1, dtype=jac.dtype)
    for _ in range(steps):
        u = jac @ u
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return ((jac @ (jac @ u)).norm(dim=(1, 2)) / u.norm(dim=(1, 2)).clamp_min(1e-300)).sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--n", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = EquilibriumModule.from_checkpoint(args.ckpt).eval()
    layers = [m for m in module.net.modules() if isinstance(m, PcDEQLayer)]
    if len(layers) != 1 or layers[0].W.kind != "dense":
        raise SystemExit("a linear pcDEQ checkpoint is needed (one dense pcDEQ layer)")
    layer = layers[0]
    images = datasets.MNIST(args.data_dir, train=False, download=False).data[: args.n].float().div(255).unsqueeze(1)
    if module.config["dataset"].get("normalize"):
        images = (images - 0.1307) / 0.3081
    cert, plain, rho, eig = [], [], [], []
    for start in range(0, len(images), 1000):
        with torch.no_grad():
            module.net(images[start:start + 1000])
        z, x_inj = layer.last_fixed_point
        cert.append(collatz_wielandt_bound(layer, z, x_inj).double())
        plain.append(collatz_wielandt_bound(layer, z, x_inj, power_steps=0).double())
        jac = dense_jacobians(layer, z, x_inj)
        rho.append(power_rho(jac))
        eig.append(torch.from_numpy(np.abs(np.linalg.eigvals(jac.numpy())).max(axis=1)))
    c, p, r, e = (torch.cat(t) for t in (cert, plain, rho, eig))
    print(f"{args.ckpt}: {len(c)} test images, activation {layer.act.name}")
    print(f"  rho(J), power iteration:  max {r.max():.4f}  mean {r.mean():.4f}  "
          f"(|power - eig| <= {(r - e).abs().max():.1e})")
    print(f"  plain bound, u = z*:      max {p.max():.4f}  mean {p.mean():.4f}")
    print(f"  certificate (10 steps):   max {c.max():.4f}  mean {c.mean():.4f}  bounds >= 1: {int((c >= 1).sum())}")
    print(f"  certificate / rho:        max {(c / r).max():.4f}  mean {(c / r).mean():.4f}  "
          f"below rho: {int((c < e * (1 - 1e-5)).sum())}")


if __name__ == "__main__":
    main()
