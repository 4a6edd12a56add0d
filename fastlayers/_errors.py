"""Exception types: each subclasses the builtin a user expects *and* RuntimeError, which is what
PyTorch itself raises for the same mistakes, so code written against torch keeps working."""


class DTypeError(TypeError, RuntimeError):
    """Unsupported or mismatched dtype."""


class ShapeError(ValueError, RuntimeError):
    """Shapes that cannot be combined."""


class DeviceError(RuntimeError):
    """Tensors on different devices, or on a device no backend can run on."""


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""
