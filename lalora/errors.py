"""Exceptions raised by lalora. Every error names the parameter, file or field at fault."""


class LaloraError(Exception):
    """Base class of all lalora errors."""


class PrecisionFileError(LaloraError, ValueError):
    """A precision file is missing, truncated, corrupted, foreign or from a newer format."""


class ModelMismatchError(LaloraError, ValueError):
    """A precision does not fit the model it is applied to (names, shapes, base model)."""


class BackendError(LaloraError, ValueError):
    """Unknown backend, bad backend option, or a backend that cannot handle the model."""


class DataError(LaloraError, ValueError):
    """Source data that cannot be used (empty, all labels masked, wrong format)."""


class AnchorMismatchError(LaloraError, ValueError):
    """The model's LoRA weights are not at the precision's anchor theta0."""
