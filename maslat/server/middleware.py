"""HTTP middleware of the stand-in server: API keys as vLLM checks them, every error as OpenAI-style JSON.

Keys mirror ``vllm/entrypoints/serve/middleware/authenticate.py`` (``AuthenticationMiddleware``): with one
or more keys (``--api-key``, else ``VLLM_API_KEY``) every path under ``/v1`` (vLLM guards ``/v1``, ``/v2``,
``/inference``, ``/cohere``) needs ``Authorization: Bearer <key>``; ``/health``, ``/metrics``, ``/version``
and ``OPTIONS`` requests stay open. Keys are compared as SHA-256 digests with ``secrets.compare_digest`` over
every key, as vLLM does, so the comparison time says nothing about the key. One difference: vLLM answers
``401 {"error": "Unauthorized"}``; the stand-in answers the nested OpenAI form
``{"error": {"message": "Unauthorized", "type": "Unauthorized", "param": null, "code": 401}}`` like its
other errors (clients that read either form, as ``traces.client`` does, see the same failure).

aiohttp's own 404, 405 and 413 are ``text/plain``; vLLM turns Starlette's ``HTTPException`` into JSON with
``type`` = the status phrase (``http_exception_handler`` in ``vllm/entrypoints/serve/exception_handling``),
and so does ``error_middleware`` here.
"""

from __future__ import annotations

import hashlib
import secrets
from http import HTTPStatus

__all__ = ["GUARDED_PREFIX", "KeyCheck", "make_middlewares"]

GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")


class KeyCheck:
    """The accepted API keys (kept as SHA-256 digests only)."""

    def __init__(self, keys):
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def verify(self, authorization: str | None) -> bool:
        """``True`` when ``authorization`` is ``Bearer <one of the keys>`` (scheme case-insensitive)."""
        if not authorization:
            return False
        scheme, _, param = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(param.encode("utf-8")).digest()
        match = False
        for d in self._digests:  # no early exit: the time taken does not depend on which key matched
            match |= secrets.compare_digest(digest, d)
        return match


def http_error(status: int, message: str | None = None, headers=None):
    """An OpenAI-style JSON error response whose ``type`` is the status phrase (vLLM's HTTPException form)."""
    from aiohttp import web

    phrase = HTTPStatus(status).phrase
    body = {"error": {"message": message or phrase, "type": phrase, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def make_middlewares(keys: KeyCheck, guard=None) -> list:
    """``[error_middleware]``: marks requests busy for the connection guard, checks keys, turns aiohttp's
    HTTP exceptions into JSON."""
    from aiohttp import web

    @web.middleware
    async def error_middleware(request, handler):
        transport = request.transport
        if guard is not None:
            guard.request_started(transport)
        try:
            if (keys and request.method != "OPTIONS" and request.path.startswith(GUARDED_PREFIX)
                    and not keys.verify(request.headers.get("Authorization"))):
                return http_error(401, "Unauthorized")
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            text = e.text or ""
            message = None if text.startswith(f"{e.status}:") else text  # aiohttp's "404: Not Found"
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return http_error(e.status, message, headers=allow)
        finally:
            if guard is not None:
                guard.request_done(transport)

    return [error_middleware]
