"""User-facing errors. Raised for bad input; never `assert` for these."""


class EyasError(Exception):
    """Base class of every error eyas raises on purpose."""


class InvalidRequestError(EyasError, ValueError):
    """A request or option is invalid. `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelNotFoundError(EyasError, FileNotFoundError):
    """A model name or folder could not be resolved to weights."""


class ConfigError(EyasError, ValueError):
    """A deployment/engine configuration cannot work (e.g. KV cache too small)."""


class WorkerUnavailableError(EyasError):
    """A model worker failed: the requests it was serving are lost; the engine restarted it."""
