"""What eyas's Ray users (batch replicas, the Ray executor) share: importing Ray with a clear error,
and turning a Ray exception into its one meaningful line."""
from __future__ import annotations

from eyas.errors import ConfigError


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray executor needs ray: pip install 'eyas[ray]' (or 'ray[default]')") from None
    return ray


def short_error(e: BaseException) -> str:
    """The last non-empty line of an exception's text (Ray wraps the cause in a long traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
