"""Bearer-token auth: a server interceptor that checks `authorization: Bearer <key>`.

The health service stays open, so load balancers and orchestrators can probe without the key.
"""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Optional

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _deny_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token (constant-time comparison)."""

    def __init__(self, api_key: str, open_prefixes: tuple[str, ...] = OPEN_PREFIXES):
        self._expected = f"Bearer {api_key}".encode()
        self._open_prefixes = open_prefixes

    def authorized(self, metadata) -> Optional[str]:
        """None when authorized, else why not."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <key>' metadata"
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        if not hmac.compare_digest(value, self._expected):
            return "invalid API key"
        return None

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open_prefixes):
            return handler
        problem = self.authorized(handler_call_details.invocation_metadata)
        return handler if problem is None else _deny_handler(handler, problem)
