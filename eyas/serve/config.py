"""ServerConfig: the gRPC server's settings (the engine's are in eyas.config.EngineConfig)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from eyas.errors import ConfigError

API_KEY_ENV = "EYAS_API_KEY"


@dataclass(frozen=True)
class ServerConfig:
    """Where and how `eyas serve` listens, and the limits it enforces per request."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (the bound one is logged)
    max_pending: int = 256  # queued + running requests; more get RESOURCE_EXHAUSTED
    max_tokens_cap: Optional[int] = None  # largest max_tokens a request may ask (None: max_model_len)
    default_max_tokens: int = 128  # max_tokens when a request leaves it unset (capped)
    grace_period: float = 10.0  # seconds in-flight requests get to finish on shutdown
    api_key: Optional[str] = None  # bearer token; None: no auth
    tls_cert: Optional[str] = None  # PEM certificate chain file
    tls_key: Optional[str] = None  # PEM private key file
    max_message_bytes: int = 64 * 2**20  # gRPC max send/receive message size
    max_request_id_len: int = 256
    tp_size: int = 1
    metrics_port: Optional[int] = None  # Prometheus GET /metrics on host:PORT; 0: any free port; None: off

    def __post_init__(self):
        if not self.host:
            raise ConfigError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {self.max_pending}")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ConfigError(f"max_tokens_cap must be >= 1, got {self.max_tokens_cap}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if not self.grace_period >= 0:
            raise ConfigError(f"grace_period must be >= 0 seconds, got {self.grace_period}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty (leave it unset to turn auth off)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}: file not found: {path}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.tp_size < 1:
            raise ConfigError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.metrics_port is not None:
            if isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int) \
                    or not 0 <= self.metrics_port <= 65535:
                raise ConfigError(f"metrics_port must be in [0, 65535] (or unset: no metrics), got {self.metrics_port!r}")
            if self.metrics_port and self.metrics_port == self.port:
                raise ConfigError(f"metrics_port must differ from port ({self.port})")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)

    def effective_max_tokens_cap(self, max_model_len: int) -> int:
        """The cap on max_tokens: the configured one, never more than the context length."""
        return min(self.max_tokens_cap or max_model_len, max_model_len)

    @classmethod
    def from_dict(cls, data: dict) -> "ServerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown server config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, section: str = "server") -> "ServerConfig":
        """Read the `server:` section of a deployment YAML (defaults when it has none)."""
        from eyas.config import read_yaml_mapping

        section_data = read_yaml_mapping(path).get(section) or {}
        if not isinstance(section_data, dict):
            raise ConfigError(f"{path}: '{section}' must be a mapping")
        return cls.from_dict(section_data)
