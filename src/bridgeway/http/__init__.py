"""Bridgeway's own HTTP/1.1 server (uvloop + httptools) and an ASGI adapter for the management API."""

from bridgeway.http.server import (
    BodyTooLarge,
    ClientGone,
    Detached,
    Handler,
    HttpServer,
    Limits,
    Request,
    RequestTimeout,
    Responder,
    serve,
    tunnel,
)

__all__ = [
    "BodyTooLarge",
    "ClientGone",
    "Detached",
    "Handler",
    "HttpServer",
    "Limits",
    "Request",
    "RequestTimeout",
    "Responder",
    "serve",
    "tunnel",
]
