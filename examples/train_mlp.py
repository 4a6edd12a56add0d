"""Train an MLP classifier on scikit-learn's handwritten digits (8x8 images, 10 classes), first as a
plain PyTorch model, then the same model after ``fastlayers.swap``; print accuracy and time per
epoch for both.

    python examples/train_mlp.py [--epochs 10] [--hidden 128] [--backend cpp|reference|triton]

Both runs start from the same initial weights and see the same batches, so their accuracies
should agree to a few tenths of a percent (fused kernels round differently). Runs in well under
a minute on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

try:
    import fastlayers as fl
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastlayers as fl


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.GELU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.SiLU(),
        nn.Linear(hidden, 10), nn.LogSoftmax(dim=-1),
    )


def load(device: torch.device):
    x, y = load_digits(return_X_y=True)
    x = x / 16.0  # pixel values are 0..16
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
    return t(xtr, torch.float32), t(ytr, torch.long), t(xte, torch.float32), t(yte, torch.long)


def train(name: str, model: nn.Module, data, epochs: int, batch: int) -> tuple[float, float]:
    """Returns (test accuracy, median seconds per epoch)."""
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)  # the same batches for both models
    times = []
    bar = tqdm(range(epochs), desc=f"{name:>10}", unit="epoch", leave=True)
    for _ in bar:
        model.train()
        t0 = time.perf_counter()
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            opt.zero_grad(set_to_none=True)
            loss = F.nll_loss(model(xtr[idx]), ytr[idx])  # the model ends in LogSoftmax
            loss.backward()
            opt.step()
        if xtr.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        acc = evaluate(model, xte, yte)
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{acc:.3f}")
    return evaluate(model, xte, yte), sorted(times)[len(times) // 2]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default=None, help="force a fastlayers backend (default: by device)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: these GEMMs are too small to share, and a second "
                        "thread on a busy machine made steps ~20x slower through OpenMP spinning)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load(device)

    torch.manual_seed(0)
    plain = make_model(args.hidden).to(device)
    fused = fl.swap(copy.deepcopy(plain), verbose=True)  # same initial weights

    force = fl.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    backend = args.backend or {"cpu": "cpp", "cuda": "triton"}.get(device.type, "?")
    with force:
        acc_p, t_p = train("PyTorch", plain, data, args.epochs, args.batch)
        acc_f, t_f = train("fastlayers", fused, data, args.epochs, args.batch)

    n = len(data[0])
    print(f"\ndigits: {n} train / {len(data[2])} test images, {args.epochs} epochs, batch {args.batch}, "
          f"hidden {args.hidden}, device {device}, fastlayers backend {backend}")
    print(f"{'model':<12}{'test acc':>10}{'s/epoch':>10}")
    print(f"{'PyTorch':<12}{acc_p:>10.4f}{t_p:>10.4f}")
    print(f"{'fastlayers':<12}{acc_f:>10.4f}{t_f:>10.4f}   ({t_p / t_f:.2f}x)")


if __name__ == "__main__":
    main()
