"""Every backend module against the one contract (fastlayers/backends/contract.py): each member of
the Backend Protocol present with the same parameter names, kinds and defaults; the optional
PackedGemm members either absent or the same. A backend that cannot be imported here is skipped
with the reason."""
import inspect

import pytest

from fastlayers._errors import BackendUnavailableError
from fastlayers.backends import _MODULES, load
from fastlayers.backends.contract import Backend, PackedGemm


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
        elif fn is not None and _params(getattr(mod, member), False) != _params(fn, True):
            problems.append(f"{member}{inspect.signature(getattr(mod, member))} != contract "
                            f"{inspect.signature(fn)}")
    for member, fn in _members(PackedGemm).items():
        if hasattr(mod, member) and _params(getattr(mod, member), False) != _params(fn, True):
            problems.append(f"optional {member}{inspect.signature(getattr(mod, member))} != contract")
    assert not problems, f"backend {name!r}: " + "; ".join(problems)
    assert mod.NAME == name and isinstance(mod.DTYPES, frozenset)


def test_the_check_can_fail():
    """A module missing a member or naming a parameter differently is reported."""
    import types
    fake = types.SimpleNamespace(**{m: (lambda *a: None) for m in _members(Backend)})
    fn = _members(Backend)["softmax_forward"]
    assert _params(lambda x, log: None, False) == _params(fn, True)
    assert _params(lambda x, logarithm: None, False) != _params(fn, True)
    del fake.norm_backward
    assert not hasattr(fake, "norm_backward")
