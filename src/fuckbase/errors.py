"""The error envelope's exception: the HTTP layer renders it, the contract names its codes."""

from __future__ import annotations

from fuckbase.contract import ErrorCode


class ApiError(Exception):
    """An error a client sees: HTTP status, stable code, human-readable message."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(400, ErrorCode.INVALID_REQUEST, message)


def not_found(code: ErrorCode, message: str) -> ApiError:
    return ApiError(404, code, message)
