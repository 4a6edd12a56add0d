"""Every backend module against the one contract (fastlayers/backends/contract.py): each member of
the Backend Protocol present with the same parameter names, kinds and defaults; the optional
PackedGemm / FusedAttention members either absent or the same. A backend that cannot be imported here is skipped
with the reason. Backends may be packages (triton: fastlayers/backends/triton/, cpp:
fastlayers/backends/cpu/): the package itself is what the registry loads and what is checked."""
import inspect
import types

import pytest
import torch

from fastlayers._errors import BackendUnavailableError
from fastlayers.backends import _MODULES, load
from fastlayers.backends.contract import Backend, FusedAttention, PackedGemm


def _members(proto):
    """name -> the Protocol's function (methods) or None (data attributes)."""
    out = {name: None for name in getattr(proto, "__annotations__", {})}
    out.update({n: f for n, f in vars(proto).items() if inspect.isfunction(f) and not n.startswith("_")})
    return out


def _params(fn, drop_self: bool):
    ps = list(inspect.signature(fn).parameters.values())[1 if drop_self else 0:]
    return [(p.name, p.kind, p.default) for p in ps]


def _backend(name):
    try:
        return load(name)
    except BackendUnavailableError as e:
        pytest.skip(f"backend {name!r} cannot be imported here: {e}")


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_backend_implements_the_contract(name):
    mod = _backend(name)
    problems = []
    for member, fn in _members(Backend).items():
        if not hasattr(mod, member):
            problems.append(f"missing {member}")
        elif member not in vars(mod):  # the dispatch reads these on every call: no __getattr__ hop
            problems.append(f"{member} is not an attribute of the module itself")
        elif fn is not None and _params(getattr(mod, member), False) != _params(fn, True):
            problems.append(f"{member}{inspect.signature(getattr(mod, member))} != contract "
                            f"{inspect.signature(fn)}")
    for member, fn in (_members(PackedGemm) | _members(FusedAttention)).items():
        if hasattr(mod, member) and _params(getattr(mod, member), False) != _params(fn, True):
            problems.append(f"optional {member}{inspect.signature(getattr(mod, member))} != contract")
    assert not problems, f"backend {name!r}: " + "; ".join(problems)
    assert mod.NAME == name and isinstance(mod.DTYPES, frozenset)
    assert isinstance(mod, Backend)


def test_triton_package_forwards_its_tunables(monkeypatch):
    """The triton package holds no copy of a tunable: each forwarded name is read from, and written
    to, the one submodule that defines and reads it, so a value set either way is the one used."""
    pkg = _backend("triton")
    assert isinstance(pkg, types.ModuleType) and hasattr(pkg, "__path__")  # the package
    assert {"INTERPRETER_SMS", "AUTOTUNE", "TMA_GEMM", "SPLIT_K_MIN_CHUNK", "_capturing"} <= set(pkg._FORWARDED)
    for name, owner in pkg._FORWARDED.items():
        assert name not in vars(pkg), f"{name}: a copy in the package would go stale"
        assert name in vars(owner), f"{name} is not defined in {owner.__name__}"
        assert getattr(pkg, name) is getattr(owner, name)
        assert name in dir(pkg)
        marker = object()
        monkeypatch.setattr(owner, name, marker)            # set on the owner: the package sees it
        assert getattr(pkg, name) is marker
        monkeypatch.setattr(pkg, name, [marker])            # set on the package: the owner gets it
        assert getattr(owner, name) == [marker] and name not in vars(pkg)
        with pytest.raises(AttributeError, match=owner.__name__):
            delattr(pkg, name)
    assert getattr(pkg, "act_forward", None) is None        # optional members stay absent
    assert not hasattr(pkg, "plain_linear_gain")


def test_the_check_can_fail():
    """A module missing a member or naming a parameter differently is reported."""
    import types
    fake = types.SimpleNamespace(**{m: (lambda *a: None) for m in _members(Backend)})
    fn = _members(Backend)["softmax_forward"]
    assert _params(lambda x, log: None, False) == _params(fn, True)
    assert _params(lambda x, logarithm: None, False) != _params(fn, True)
    del fake.norm_backward
    assert not hasattr(fake, "norm_backward")


def test_cpp_is_the_cpu_package():
    """The registry's "cpp" is the package fastlayers.backends.cpu itself: the packed-weight cache keys
    on it (gemm._SELF) and calls its prepack_weight, which is the package's own attribute."""
    import fastlayers.backends.cpu as cpu
    from fastlayers.backends.cpu import gemm
    assert _backend("cpp") is cpu and gemm._SELF is cpu and hasattr(cpu, "__path__")
    for member in _members(PackedGemm):
        assert member in vars(cpu), f"optional {member} is not an attribute of the package itself"


def test_cpu_tunables_live_in_one_module(monkeypatch):
    """Each tunable of the CPU backend is defined in one submodule and read there (no copy on the
    package to go stale); the per-call gates of fastlayers._dispatch read it off that module, so a
    value patched there is the one they see."""
    from fastlayers import _dispatch
    from fastlayers.activations import ACTIVATIONS
    from fastlayers.backends.cpu import gemm, softmax
    mod = _backend("cpp")
    tunables = {gemm: ["ROUTE", "ONEDNN_MIN_MACS", "PACKED_MIN_MACS", "PACKED_MIN_K", "TORCH_OPS_MAX_OUT",
                       "TORCH_OPS_MAX_MACS", "_FP32_MM_ONEDNN", "_onednn_ok", "_linear_pointwise"],
                softmax: ["TORCH_SOFTMAX_MAX_NUMEL"]}
    for owner, names in tunables.items():
        for name in names:
            assert hasattr(owner, name) and not hasattr(mod, name), f"{name}: one home, {owner.__name__}"
    assert mod.gemm is gemm and mod.softmax is softmax  # how _dispatch reaches them
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    relu = ACTIVATIONS["relu"]
    with torch.no_grad():
        assert _dispatch.tiny_cpu_linear(x, w, None, relu, 0.0) is not None
        monkeypatch.setattr(gemm, "ROUTE", "mkl")  # a forced route: the gate leaves it to the backend
        assert _dispatch.tiny_cpu_linear(x, w, None, relu, 0.0) is None
        monkeypatch.setattr(gemm, "ROUTE", "auto")
        monkeypatch.setattr(gemm, "TORCH_OPS_MAX_OUT", 7)  # 2 x 4 outputs: over the limit
        assert _dispatch.tiny_cpu_linear(x, w, None, relu, 0.0) is None
        s = torch.randn(4, 4)
        assert _dispatch.tiny_cpu_softmax(s, -1, None, False) is not None
        monkeypatch.setattr(softmax, "TORCH_SOFTMAX_MAX_NUMEL", 16)
        assert _dispatch.tiny_cpu_softmax(s, -1, None, False) is None
