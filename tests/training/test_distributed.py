"""Distributed training (gloo, 2 CPU processes): a model with fastlayers layers trains under
DistributedDataParallel and under FSDP2 (torch.distributed.fsdp.fully_shard), and after a few
steps its parameters equal single-process training on the full batch. Each case costs two fresh
Python processes (a few seconds). FSDP2's sharded parameters are DTensors: whatever reaches a
fastlayers op as a DTensor takes the PyTorch composite route; all-gathered ones run the kernels."""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastlayers as fl
from integration_helpers import backend_skip_reason, run_gloo_rank

WORLD, BATCH, STEPS = 2, 8, 3
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


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
        F.nll_loss(model(x), y).backward()  # mean over the batch: both wrappers average across ranks
        opt.step()


def _wrap(model: nn.Module, kind: str) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, fl.FusedLinear):
            fully_shard(layer)
    return fully_shard(model)


def _worker(rank: int, kind: str, store: str, backend: str, out: str) -> None:
    def body():
        model = _wrap(_model(), kind)
        xs, ys = _data()
        per = BATCH // WORLD
        _train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        state = model.state_dict()
        state = {k.removeprefix("module."): getattr(v, "full_tensor", lambda v=v: v)() for k, v in state.items()}
        if rank == 0:
            torch.save(state, out)
    run_gloo_rank(rank, WORLD, store, backend, body)


@needs_gloo
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_training_matches_single_process(tmp_path, kind):
    # One backend only: each run costs two fresh interpreters. The wrappers see plain Parameters
    # (or DTensors) and autograd, whatever the backend.
    backend = "cpp" if backend_skip_reason("cpp") is None else "reference"
    out = str(tmp_path / "state.pt")
    mp.spawn(_worker, args=(kind, str(tmp_path / "rendezvous"), backend, out), nprocs=WORLD, join=True)
    trained = torch.load(out)
    with fl.use_backend(backend):
        single = _model()
        assert any(isinstance(m, fl.FusedLinear) for m in single.modules())
        xs, ys = _data()
        _train(single, xs, ys)
    state = single.state_dict()
    assert list(trained) == list(state)
    for k, v in state.items():
        # gradients are reduced in another order across ranks: fp32 rounding only
        torch.testing.assert_close(trained[k], v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(state["0.weight"], _model().state_dict()["0.weight"])  # it trained


@needs_gloo
def test_dtensor_inputs_take_the_composite_route(backend):
    """A DTensor on a 1-process mesh: fastlayers computes what PyTorch computes for it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
            dx, dw, db = (distribute_tensor(t, mesh, [Replicate()]) for t in (x, w, b))
            y = fl.linear_act(dx, dw, db, "gelu")
            torch.testing.assert_close(y.full_tensor(), F.gelu(F.linear(x, w, b)))
            torch.testing.assert_close(fl.softmax(dx, -1).full_tensor(), torch.softmax(x, -1))
        finally:
            dist.destroy_process_group()
