"""Error replies of the OpenAI-compatible API, in OpenAI's shape.

Every error, FastAPI's and Starlette's own included, is the spec's `ErrorResponse`
`{"error": {"message", "type", "param", "code"}}` (`code` one of OpenAI's strings, or null), with a
4xx status for bad input: `ApiError` is one, `add_error_handlers` turns every other exception into
one, and `BodyLimit` refuses an oversize body in the same shape.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException


class ApiError(Exception):
    """An error reply: `kind` is OpenAI's error `type`, `code` one of OpenAI's error codes or None."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = 'invalid_request_error',
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    @classmethod
    def invalid(cls, message: str, param: str) -> 'ApiError':
        """A 400 for a bad value of request parameter `param`."""
        return cls(400, message, param, code='invalid_value')

    def body(self) -> dict:
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}

    def response(self, headers=None) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers)


def validation_code(error_type: str) -> str:
    """OpenAI's error code for a pydantic error type."""
    if error_type == 'missing':
        return 'missing_required_parameter'
    if error_type == 'extra_forbidden':
        return 'unknown_parameter'
    return 'invalid_type' if error_type.endswith('_type') else 'invalid_value'


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413, whether it declares its length or not.
    (FastAPI's own `max_body_size` answers a declared oversize body in plain text, not JSON.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get('content-length', '')
        too_large = HTTPException(413, f'the request body is over the limit of {self.max_bytes} bytes')
        received = 0

        async def limited_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large  # unread
            message = await receive()
            received += len(message.get('body', b''))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a request raises becomes an `ApiError` reply."""

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0]
        if first['type'] == 'json_invalid':
            return ApiError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}").response()
        where = '.'.join(str(part) for part in first['loc'][1:])
        if not where:
            return ApiError(400, 'the request body must be a JSON object (Content-Type: application/json)',
                            code='invalid_type').response()
        message = 'unknown field' if first['type'] == 'extra_forbidden' else first['msg'].removeprefix('Value error, ')
        return ApiError(400, f'{where}: {message}', where, code=validation_code(first['type'])).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # Starlette's own: 404 and 405 routes, 413
        return ApiError(e.status_code, str(e.detail)).response(e.headers)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return ApiError(500, f'internal error: {type(e).__name__}: {e}', kind='server_error').response()
