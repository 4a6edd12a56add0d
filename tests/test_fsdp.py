"""FSDP2 (torch.distributed.fsdp.fully_shard, gloo, 2 CPU processes): a model with fastlayers
layers trains sharded, and after a few steps its parameters equal unsharded single-process
training on the full batch. Sharded parameters are DTensors: whatever reaches a fastlayers op as
a DTensor takes the PyTorch composite route; all-gathered ones run the kernels."""
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
    return nn.Sequential(fl.FusedLinear(10, 32, activation="gelu"), fl.FusedLinear(32, 16, activation="relu"),
                         fl.FusedLinear(16, 5, activation="none"), fl.LogSoftmax(dim=-1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 10, generator=g), torch.randint(0, 5, (STEPS, BATCH), generator=g)


def _train(model: nn.Module, xs, ys) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.nll_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, store: str, backend: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    os.environ["FASTLAYERS_BACKEND"] = backend
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        for layer in list(model)[:3]:
            fully_shard(layer)
        fully_shard(model)
        xs, ys = _data()
        per = BATCH // WORLD
        _train(model, xs[:, rank * per:(rank + 1) * per], ys[:, rank * per:(rank + 1) * per])
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_fsdp2_matches_single_process(tmp_path):
    backend = "cpp" if backend_skip_reason("cpp") is None else "reference"
    out = str(tmp_path / "fsdp.pt")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), backend, out), nprocs=WORLD, join=True)
    sharded = torch.load(out)
    with fl.use_backend(backend):
        single = _model()
        xs, ys = _data()
        _train(single, xs, ys)
    state = single.state_dict()
    assert list(sharded) == list(state)
    for k, v in state.items():
        torch.testing.assert_close(sharded[k], v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(state["0.weight"], _model().state_dict()["0.weight"])  # it trained


def test_dtensor_inputs_take_the_composite_route(backend):
    """A DTensor on a 1-process mesh: fastlayers computes what PyTorch computes for it."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    import tempfile
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
