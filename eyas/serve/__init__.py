"""gRPC serving: `eyas serve`, the eyas.v1.Generation service, auth, and the engine thread.

Modules: config (ServerConfig), convert (proto <-> engine), engine_loop (the engine thread),
service (the RPCs), auth (bearer token), server (GenerationServer, `run_server`), background
(BackgroundServer for tests and embedding), cli_serve (`eyas serve`), v1 (generated code).
"""
from eyas.serve.config import ServerConfig

__all__ = ["ServerConfig"]
