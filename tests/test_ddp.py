"""DistributedDataParallel: a model with fastlayers layers trains under DDP
(gloo, 2 CPU processes), and after a few steps its parameters equal single-process training on
the full batch. Takes a few seconds (two fresh Python processes)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from integration_helpers import backend_skip_reason

WORLD, BATCH, STEPS = 2, 8, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    # A swapped plain model (as users would get it) with a fastlayers LogSoftmax head.
    return fl.swap(nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 5), nn.LogSoftmax(dim=-1)))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 10, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def _train(model: nn.Module, xs, ys) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()  # mean over the batch: DDP averages across ranks
        opt.step()


def _worker(rank: int, store: str, backend: str, out: str) -> None:
    os.environ["FASTLAYERS_BACKEND"] = backend  # forced in this process, as in the parent test
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to pick, so no race with other processes for a free port
    # (the suspected cause of an earlier rank abort under load).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        xs, ys = _data()
        per = BATCH // WORLD
        _train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        if rank == 0:
            torch.save(model.module.state_dict(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_ddp_matches_single_process(tmp_path):
    # One backend only: each run costs two fresh interpreters (DDP imports torch._dynamo, ~5 s
    # on a loaded 2-core machine). DDP sees plain Parameters and autograd, whatever the backend.
    backend = "cpp" if backend_skip_reason("cpp") is None else "reference"
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), backend, out), nprocs=WORLD, join=True)
    ddp_state = torch.load(out)

    with fl.use_backend(backend):
        single = _model()
        assert any(isinstance(m, fl.FusedLinear) for m in single.modules())
        xs, ys = _data()
        _train(single, xs, ys)
    state = single.state_dict()
    assert list(ddp_state) == list(state)
    for k, v in state.items():
        # gradients are averaged in another order (allreduce): fp32 rounding only
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(state["0.weight"], _model().state_dict()["0.weight"])  # it trained
