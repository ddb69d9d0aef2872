"""`eyas serve`: the gRPC server command (engine flags as for `eyas generate`, plus server flags)."""
from __future__ import annotations

import argparse
import logging
import os

from eyas.serve.config import API_KEY_ENV, ServerConfig

log = logging.getLogger("eyas.serve")

# flag dest -> ServerConfig field
_SERVER_FLAGS = ("host", "port", "max_pending", "max_tokens_cap", "default_max_tokens", "grace_period",
                 "api_key", "tls_cert", "tls_key", "max_message_bytes", "metrics_port")


def add_serve_parser(sub) -> None:
    from eyas.cli import add_engine_args

    p = sub.add_parser("serve", help="serve the eyas.v1.Generation gRPC API until SIGTERM",
                       description="Serve the eyas.v1.Generation gRPC API (plus grpc.health.v1 and "
                                   "reflection). YAML configs hold `engine:` and `server:` sections; "
                                   "flags override them.")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port to bind (default 50051; 0: any free port)")
    g.add_argument("--max-pending", type=int, help="queued + running requests before RESOURCE_EXHAUSTED (default 256)")
    g.add_argument("--max-tokens-cap", type=int, help="largest max_tokens a request may ask (default: max_model_len)")
    g.add_argument("--default-max-tokens", type=int, help="max_tokens when a request leaves it unset (default 128)")
    g.add_argument("--grace-period", type=float, help="seconds in-flight requests get on shutdown (default 10)")
    g.add_argument("--api-key", help=f"require 'authorization: Bearer KEY' (or set ${API_KEY_ENV})")
    g.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (with --tls-key)")
    g.add_argument("--tls-key", help="PEM private key")
    g.add_argument("--max-message-bytes", type=int, help="gRPC max message size (default 64 MiB)")
    g.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; default: off)")
    p.set_defaults(func=cmd_serve)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """YAML `server:` section, then $EYAS_API_KEY, then flags (later wins)."""
    cfg = ServerConfig.from_yaml(args.config) if getattr(args, "config", None) else ServerConfig()
    changes = {k: getattr(args, k) for k in _SERVER_FLAGS if getattr(args, k, None) is not None}
    if "api_key" not in changes and os.environ.get(API_KEY_ENV):
        changes["api_key"] = os.environ[API_KEY_ENV]
    changes["tp_size"] = getattr(args, "tp", 1) or 1
    return cfg.replace(**changes)


def cmd_serve(args: argparse.Namespace) -> int:
    from eyas.cli import engine_config_from_args
    from eyas.engine import create_engine
    from eyas.serve.server import run_server

    server_cfg = server_config_from_args(args)
    engine_cfg = engine_config_from_args(args)
    logging.getLogger("eyas.serve").setLevel(logging.INFO)  # "serving on ..." is always shown
    draft = f" with draft {engine_cfg.spec.draft}" if engine_cfg.spec.enabled else ""
    log.info("loading %s%s", engine_cfg.model, draft)
    engine = create_engine(engine_cfg)
    run_server(engine, server_cfg)
    return 0
