"""Bad input gets a clear error naming the op, the argument and what was expected; inputs are
never modified. Error types are what a torch user expects (our classes also subclass
RuntimeError, which PyTorch raises for the same mistakes)."""
import pytest
import torch

import fastlayers as fl
import fastlayers.backends as B


def x_w_b(dtype=torch.float32):
    return torch.randn(3, 5, dtype=dtype), torch.randn(4, 5, dtype=dtype), torch.randn(4, dtype=dtype)


@pytest.mark.parametrize("x,w,b,match", [
    (torch.randn(3, 6), torch.randn(4, 5), None, r"fastlayers.linear_act: x has 6 features .* expects 5"),
    (torch.randn(3, 5), torch.randn(4, 5), torch.randn(5), r"expected bias of shape \(4,\)"),
    (torch.randn(3, 5), torch.randn(4, 5), torch.randn(1, 4), r"expected bias of shape \(4,\)"),
    (torch.randn(3, 5), torch.randn(20), None, r"expected weight of shape \(out_features, in_features\)"),
    (torch.randn(3, 5), torch.randn(2, 4, 5), None, r"expected weight of shape"),
    (torch.tensor(1.0), torch.randn(4, 1), None, r"expected x of shape \(\*, in_features\), got a 0-d"),
])
def test_linear_shape_errors(backend, x, w, b, match):
    with pytest.raises(ValueError, match=match):
        fl.linear_act(x, w, b)
    with pytest.raises(RuntimeError, match=match):  # what torch itself raises
        fl.linear_act(x, w, b)


@pytest.mark.parametrize("which", ["x", "weight", "bias"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_linear_non_float_dtypes(backend, which, dtype):
    x, w, b = x_w_b()
    args = {"x": x, "weight": w, "bias": b}
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=f"fastlayers.linear_act: expected {which} to be a floating-point tensor.*{dtype}"):
        fl.linear_act(args["x"], args["weight"], args["bias"])


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_linear_mixed_dtypes(backend, which):
    x, w, b = x_w_b()
    args = {"weight": w, "bias": b}
    args[which] = args[which].double()
    with pytest.raises(TypeError, match=f"expected {which} to have the same dtype as x \\(torch.float32\\), got torch.float64"):
        fl.linear_act(x, args["weight"], args["bias"])


def test_not_a_tensor(backend):
    with pytest.raises(TypeError, match="fastlayers.linear_act: expected x to be a torch.Tensor, got list"):
        fl.linear_act([[1.0]], torch.randn(1, 1))
    with pytest.raises(TypeError, match="fastlayers.softmax: expected x to be a torch.Tensor"):
        fl.softmax([1.0, 2.0])


@pytest.mark.parametrize("name", ["swish", "GELU", "", None, 3])
def test_unknown_activation(backend, name):
    x, w, b = x_w_b()
    with pytest.raises(ValueError, match="unknown activation .*expected one of none, relu, leaky_relu, gelu, gelu_tanh"):
        fl.linear_act(x, w, b, name)


@pytest.mark.parametrize("op", [fl.softmax, fl.log_softmax])
@pytest.mark.parametrize("shape,dim", [((3, 4), 2), ((3, 4), -3), ((), 1), ((5,), -2)])
def test_softmax_dim_out_of_range(backend, op, shape, dim):
    with pytest.raises(IndexError, match=r"softmax: Dimension out of range"):
        op(torch.randn(shape), dim)


@pytest.mark.parametrize("op", [fl.softmax, fl.log_softmax])
def test_softmax_bad_dim_type_and_dtype(backend, op):
    with pytest.raises(TypeError, match="expected dim to be an int"):
        op(torch.randn(3), 0.5)
    with pytest.raises(TypeError, match="expected x to be a floating-point tensor.*torch.int64"):
        op(torch.arange(6), 0)


def test_cuda_tensor_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the 'CUDA absent' error cannot happen here")
    with pytest.raises(RuntimeError, match="fastlayers.linear_act: got a tensor on cuda, but CUDA is not available"):
        B.select(torch.device("cuda"), "fastlayers.linear_act")


def test_tensor_on_a_device_without_backend():
    with pytest.raises(RuntimeError, match="fastlayers.softmax: no fastlayers backend runs on device 'xpu'"):
        B.select(torch.device("xpu"), "fastlayers.softmax")


def test_meta_tensors_give_shapes():
    """Model initialisation on the meta device (no data): shapes and dtypes like torch's."""
    m = fl.FusedLinear(6, 4, activation="gelu", device="meta")
    y = m(torch.empty(3, 5, 6, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 5, 4)
    assert fl.log_softmax(torch.empty(2, 7, device="meta", dtype=torch.bfloat16), 0).dtype == torch.bfloat16


def test_forced_backend_that_cannot_run():
    with fl.use_backend("cpp"):
        with pytest.raises(RuntimeError, match="backend 'cpp' cannot run on meta: the cpp backend runs on CPU tensors only"):
            fl.softmax(torch.empty(2, device="meta"))
    try:
        B.load("triton")
    except fl.BackendUnavailableError as e:  # triton not installed here: that is the clear error
        assert "backend 'triton' is not available" in str(e)
        return
    with fl.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run on meta"):
            fl.softmax(torch.randn(3, device="meta"))


def test_inputs_never_modified_even_on_error(backend):
    x, w, b = x_w_b()
    x0, w0, b0 = x.clone(), w.clone(), b.clone()
    with pytest.raises(ValueError):
        fl.linear_act(x, w, torch.randn(7))
    fl.linear_act(x, w, b, "gelu")
    fl.softmax(x)
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(b, b0)
