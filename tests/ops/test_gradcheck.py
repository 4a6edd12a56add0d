"""fp64 torch.autograd.gradcheck through every op x activation, on the CPU backends."""
import pytest
import torch

import fastlayers as fl
from fastlayers.activations import NAMES


def off_kinks(z: torch.Tensor) -> bool:
    return bool((z.abs() > 1e-2).all())


@pytest.mark.parametrize("act", NAMES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_gradcheck(backend, act, bias):
    g = torch.Generator().manual_seed(0)
    while True:  # keep pre-activations off relu / leaky_relu's kink at 0
        x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
        w = torch.randn(4, 5, dtype=torch.float64, generator=g)
        b = torch.randn(4, dtype=torch.float64, generator=g) if bias else None
        if off_kinks(torch.nn.functional.linear(x, w, b)):
            break
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fn = (lambda x, w, b: fl.linear_act(x, w, b, act)) if bias else (lambda x, w: fl.linear_act(x, w, None, act))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("slope", [0.2, -0.5])
def test_leaky_relu_gradcheck(backend, slope):
    x = torch.tensor([[0.5, -1.5, 2.0], [-0.7, 0.9, -2.2]], dtype=torch.float64, requires_grad=True)
    w = torch.eye(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fl.linear_act(x, w, None, "leaky_relu", slope), (x, w))


@pytest.mark.parametrize("op", [fl.softmax, fl.log_softmax], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((4, 7), -1), ((4, 7), 0), ((2, 3, 5), 1), ((6,), 0)])
def test_softmax_gradcheck(backend, op, shape, dim):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, dim), (x,))
