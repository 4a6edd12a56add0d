"""The C++ extension built for a generic x86-64 / any CPU (FASTLAYERS_NATIVE=0: no -march=native,
so none of the AVX-512 paths) gives the same results. This machine has AVX-512, so without this
test the portable fallbacks of csrc/ (vexp, vrcp, bf16 load/store, horizontal sums) never run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import torch, fastlayers as fl, torch.nn.functional as F
from fastlayers import _C, _dispatch
from fastlayers.activations import ACTIVATIONS, NAMES
assert "portable" in _C.__file__, _C.__file__
assert _dispatch._FAST_TINY_LINEAR is None  # built with FASTLAYERS_FASTPATH=0: the Python gate alone
x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
with torch.no_grad():
    assert torch.equal(fl.linear_act(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
    x = (torch.randn(37, 29, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    w = (torch.randn(23, 29, dtype=torch.float64) / 5).to(dtype).requires_grad_()
    b = torch.randn(23, dtype=torch.float64).to(dtype).requires_grad_()
    for act in NAMES:
        for ref in (False, True):
            with fl.use_backend("reference" if ref else "cpp"):
                y = fl.linear_act(x, w, b, act)
                g = torch.autograd.grad(y.float().square().sum(), (x, w, b))
            if ref:
                torch.testing.assert_close(y0, y, rtol=tol, atol=tol, equal_nan=True)
                for a, r in zip(g0, g):
                    torch.testing.assert_close(a, r, rtol=tol, atol=tol * 30)
            y0, g0 = y, g
    for dim in (0, 1):
        for op in (fl.softmax, fl.log_softmax):
            xs = x.detach() * 4
            ys = [None, None]
            for i, name in enumerate(("cpp", "reference")):
                with fl.use_backend(name):
                    ys[i] = op(xs, dim)
            torch.testing.assert_close(ys[0], ys[1], rtol=tol, atol=tol)
long = torch.randn(3, 5000) * 30
long[0, :2100] = float("-inf")
torch.testing.assert_close(fl.softmax(long, -1), torch.softmax(long, -1), equal_nan=True)
print("portable build OK")
"""


@pytest.mark.slow
def test_portable_build_matches_reference(tmp_path):
    if sys.platform == "win32":
        pytest.skip("the extension is built for Linux/macOS only")
    src = tmp_path / "portable"
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copytree(ROOT / "fastlayers", src / "fastlayers",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", ".built-ext"))
    shutil.copy(ROOT / "setup.py", src / "setup.py")
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    shutil.copy(ROOT / "README.md", src / "README.md")
    # (FASTLAYERS_FASTPATH=0: _fastpath does not depend on the CPU flags; without it, the CHECK
    # also runs fastlayers as a build without torch at build time would)
    env = dict(os.environ, FASTLAYERS_NATIVE="0", FASTLAYERS_FASTPATH="0")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src,
                           env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=src, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "portable build OK" in run.stdout
