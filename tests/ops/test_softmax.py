"""fl.softmax / fl.log_softmax (+ modules) forward and backward against PyTorch, CPU backends."""
import pytest
import torch

import fastlayers as fl

from conftest import FLOAT_DTYPES, assert_matches

OPS = {"softmax": (fl.softmax, torch.softmax), "log_softmax": (fl.log_softmax, torch.log_softmax)}


def check(op, x, dim, g=None):
    ours_fn, torch_fn = OPS[op]
    x0 = x.detach().clone()
    xs = x.detach().requires_grad_()
    y = ours_fn(xs, dim)
    g = torch.randn_like(y) if g is None else g
    y.backward(g)
    assert torch.equal(xs.detach().nan_to_num(), x0.nan_to_num()), "input modified"

    def ref(dtype):
        xr = x0.to(dtype).detach().requires_grad_()  # a new leaf per call
        yr = torch_fn(xr, dim)
        yr.backward(g.to(dtype))
        return yr, xr.grad

    (y64, g64), (ye, ge) = ref(torch.float64), ref(x.dtype)
    assert y.dtype == ye.dtype and y.shape == ye.shape
    assert_matches(y.detach(), y64, ye.detach(), what=f"{op} y")
    # dx holds a sum over the row (of dy, or dy * y): its fp32 atol scales with the row length
    red = x.shape[dim] if x.dim() else 1
    assert_matches(xs.grad, g64, ge, red=red, what=f"{op} dx")


SHAPES_DIMS = [
    ((), 0), ((), -1),                       # 0-d
    ((0,), 0), ((3, 0), 1), ((0, 5), 1), ((3, 0), 0), ((2, 0, 4), 2),  # zero-size
    ((1,), 0), ((5,), -1), ((1, 1), 1),
    ((7, 300, 5), 0), ((7, 300, 5), 1), ((7, 300, 5), 2), ((7, 300, 5), -1),
    ((2, 3, 4, 5), 1), ((2, 3, 4, 70), 2), ((4, 33), 0),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS, ids=str)
def test_matches_torch(backend, op, dtype, shape, dim):
    torch.manual_seed(0)
    check(op, torch.randn(shape, dtype=dtype) * 3, dim)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 255, 256, 257, 1023, 1024, 1025, 4099])
def test_row_lengths(backend, op, dtype, length):
    torch.manual_seed(1)
    check(op, torch.randn(3, length, dtype=dtype) * 4, -1)


@pytest.mark.parametrize("op", OPS)
def test_million_element_row(op):
    """A single row of 1,000,000: fp32 accuracy vs float64 (fp64 partial sums), forward and backward.
    C++ backend only: torch's own fp32 softmax is off by up to 4.4e-4 relative on this row (its
    fp32 sum), so the reference backend cannot meet the fp32 tolerance here."""
    torch.manual_seed(2)
    with fl.use_backend("cpp"):
        check(op, torch.randn(1, 1_000_000) * 5, -1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [0, 1])
def test_infinities_and_nan(backend, op, dtype, dim):
    """Fully -inf rows give NaN (like torch), partly -inf rows are fine, +inf and NaN poison a row."""
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor([
        [-inf, -inf, -inf, -inf],   # fully -inf -> NaN
        [-inf, 1.0, -inf, 2.0],     # partly -inf
        [0.0, inf, 1.0, 2.0],       # +inf -> NaN row
        [0.0, nan, 1.0, 2.0],       # NaN -> NaN row
        [1e30, -1e30, 0.0, 1e-30],  # extremes
        [-1e30, -1e30, -1e30, -1e30],
    ], dtype=dtype)
    x = rows if dim == 1 else rows.t().contiguous()
    ours_fn, torch_fn = OPS[op]
    y = ours_fn(x, dim)
    torch.testing.assert_close(y, torch_fn(x, dim), equal_nan=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_grad"])
def test_non_contiguous(backend, op, layout):
    torch.manual_seed(3)
    g = None
    if layout == "transposed":
        x = torch.randn(40, 30).t()
    elif layout == "sliced":
        x = torch.randn(30, 80)[:, ::2]
    else:
        x = torch.randn(30, 40)
        g = torch.randn(1, 40).expand(30, 40)
    for dim in (0, 1):
        check(op, x, dim, g)


def test_dtype_argument(backend):
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    for ours, ref in ((fl.softmax, torch.softmax), (fl.log_softmax, torch.log_softmax)):
        y = ours(x, -1, dtype=torch.float32)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref(x, -1, dtype=torch.float32))


def test_modules(backend):
    torch.manual_seed(4)
    x = torch.randn(3, 5, 7)
    for ours, ref in ((fl.Softmax(dim=1), torch.nn.Softmax(dim=1)),
                      (fl.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1))):
        assert isinstance(ours, type(ref))
        torch.testing.assert_close(ours(x), ref(x))
        assert repr(ours).endswith(repr(ref).split("(", 1)[1])


def test_saved_output_modified_in_place_raises(backend):
    x = torch.randn(3, 4, requires_grad=True)
    y = fl.softmax(x, -1)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("op", OPS)
def test_double_backward(backend, op):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: OPS[op][0](t, 1), (x,))


@pytest.mark.parametrize("op", OPS)
def test_create_graph_first_order_is_torchs(backend, op):
    """With create_graph=True the backward is a second formula (PyTorch ops, differentiable):
    gradgradcheck only checks it against its own derivative, so check its value against torch."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, dtype=torch.float64)
    (got,) = torch.autograd.grad(OPS[op][0](x, 1), x, dy, create_graph=True)
    (want,) = torch.autograd.grad(OPS[op][1](x, 1), x, dy)
    torch.testing.assert_close(got, want)


def test_threads_agree(backend):
    """The OpenMP split (rows or column blocks) never changes a result."""
    torch.manual_seed(5)
    x = torch.randn(64, 2048)
    n = torch.get_num_threads()
    outs = []
    for t in (1, max(n, 3)):  # >= 3 threads even on a 1-core machine, or this compares 1 with 1
        torch.set_num_threads(t)
        try:
            outs.append((fl.softmax(x, 1), fl.log_softmax(x, 0)))
        finally:
            torch.set_num_threads(n)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_long_rows_chunk_boundaries(backend, op, dtype):
    """The C++ kernel works on 2048-element chunks of a row and rescales between them: a chunk
    that is all -inf, a max that only appears in a late chunk, values far below the max."""
    torch.manual_seed(6)
    x = torch.randn(5, 7000, dtype=dtype)
    x[0, :2048] = float("-inf")        # first chunk empty
    x[1, 2048:4096] = float("-inf")    # a middle chunk empty
    x[2, 6500] = 60.0                  # the max arrives late
    x[3, :3000] -= 200.0               # early chunks underflow against the max
    x[4, 4100:] = float("-inf")        # the tail chunks empty
    check(op, x, -1)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4), (2, 3, 4, 5)])
def test_implicit_dim_like_torch(backend, shape):
    """dim=None (nn.Softmax() without dim): torch's legacy choice and its deprecation warning."""
    x = torch.randn(shape)
    for ours, ref in ((fl.Softmax(dim=None), torch.nn.Softmax(dim=None)),
                      (fl.LogSoftmax(dim=None), torch.nn.LogSoftmax(dim=None))):
        with pytest.warns(UserWarning, match="Implicit dimension choice"):
            y = ours(x)
        with pytest.warns(UserWarning):
            torch.testing.assert_close(y, ref(x))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,dim", [((7, 300), 1), ((7, 300, 5), 1), ((3, 4099), -1)], ids=str)
def test_float16(backend, op, shape, dim):
    torch.manual_seed(8)
    check(op, torch.randn(shape, dtype=torch.float16) * 3, dim)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(2, 3), (3, 5, 7), (4, 3000)], ids=str)
def test_dim_spellings_give_the_same_bits(op, shape):
    """dim as an int, a numpy integer or a 0-d integer tensor: the same path (the tiny-CPU gate, or
    not), so the same bits, forward and backward; no backend forced (the gates only run then)."""
    np = pytest.importorskip("numpy")
    ours = OPS[op][0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    results = []
    for dim in (1, np.int64(1), np.int32(1), torch.tensor(1), -len(shape) + 1, np.int64(-len(shape) + 1)):
        xl = x.clone().requires_grad_()
        y = ours(xl, dim)
        y.backward(dy)
        results.append((dim, y.detach(), xl.grad))
    for dim, y, dx in results[1:]:
        assert torch.equal(y, results[0][1]), f"{op} y: dim={dim!r} ({type(dim).__name__}) differs from dim=1"
        assert torch.equal(dx, results[0][2]), f"{op} dx: dim={dim!r} ({type(dim).__name__}) differs from dim=1"
    with pytest.raises(TypeError):
        ours(x, True)
    with pytest.raises(TypeError):
        ours(x, 1.0)
