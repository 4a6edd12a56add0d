"""The C++ extension fastlayers._C as the CPU backend sees it: the import (a clear error when it is
not built), the check of its activation / dtype codes against the Python tables, the buffer
descriptors its entry points take, and the output allocator."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

try:
    from ... import _C
except ImportError as e:  # never fall back silently to something slower
    raise ImportError(
        "the C++ extension fastlayers._C is not built; build it with `make build` "
        "(or `python setup.py build_ext --inplace`, or `pip install .`)") from e

# dtype codes of the extension's buffers (csrc/common.h), checked against _C below.
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
DTYPES = frozenset(_CODES)


def _check_codes() -> None:
    """The extension's activation and dtype codes must be the Python tables' (one source of
    truth: fastlayers/activations.py and _CODES above); a stale build fails loudly here."""
    from ...activations import ACTIVATIONS
    acts = {name: a.code for name, a in ACTIVATIONS.items()}
    dtypes = {str(d).replace("torch.", ""): c for d, c in _CODES.items()}
    if dict(_C.ACTIVATION_CODES) != acts or dict(_C.DTYPE_CODES) != dtypes:
        raise ImportError(
            "fastlayers._C was built with other activation/dtype codes than this fastlayers "
            f"(extension: {dict(_C.ACTIVATION_CODES)}, {dict(_C.DTYPE_CODES)}; python: {acts}, "
            f"{dtypes}); rebuild it with `make build`")


_check_codes()


def _buf(t: Optional[Tensor]):
    """A tensor as the extension's buffer descriptor (data_ptr, dtype code, shape, strides);
    the extension checks it against what each kernel reads (csrc/bindings.cpp)."""
    return None if t is None else (t.data_ptr(), _CODES[t.dtype], t.shape, t.stride())


# From here up glibc serves allocations with fresh mmaps, faulted in page by page; smaller ones are
# usually recycled heap memory, where the advice measured slower. See bench/results/cpu-routes.md.
_HUGE_MIN_BYTES = 32 << 20


def _cached_empty():
    """fastlayers._fastpath's output cache (csrc/torch/fastpath.cpp), or None where it is not built
    or was built against another torch (_dispatch._load_fastpath warns about that)."""
    try:
        from ... import _fastpath
    except ImportError:
        return None
    return _fastpath.cached_empty if _fastpath.TORCH_VERSION == torch.__version__ else None


_CACHED_EMPTY = _cached_empty()
_CACHED_MIN_BYTES = _HUGE_MIN_BYTES  # (= _dispatch.CACHED_MIN_BYTES: the same glibc threshold)


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    """A new contiguous CPU tensor. From _HUGE_MIN_BYTES up: from the output cache where
    fastlayers._fastpath is built (freed outputs of that size are reused instead of being faulted
    in and zeroed again: fastlayers.empty_cache()), else a fresh buffer backed by transparent huge
    pages where the OS allows (madvise), which would otherwise be paid for with one page fault per
    4 KiB (see bench/results/cpu-routes.md)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _CACHED_MIN_BYTES and _CACHED_EMPTY is not None:
        return _CACHED_EMPTY(shape, dtype)
    t = torch.empty(shape, dtype=dtype)
    if nbytes >= _HUGE_MIN_BYTES:
        _C.advise_hugepages(t.data_ptr(), nbytes)
    return t
