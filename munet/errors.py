"""Errors the core raises; each transport maps `code` to its own status (gRPC code, HTTP status)."""

from __future__ import annotations


class MunetError(Exception):
    code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotFound(MunetError):
    code = "NOT_FOUND"
    http_status = 404


class InvalidArgument(MunetError):
    code = "INVALID_ARGUMENT"
    http_status = 400


class AlreadyExists(MunetError):
    code = "ALREADY_EXISTS"
    http_status = 409


class FailedPrecondition(MunetError):
    code = "FAILED_PRECONDITION"
    http_status = 412


class Unavailable(MunetError):
    code = "UNAVAILABLE"
    http_status = 503


class DeadlineExceeded(MunetError):
    code = "DEADLINE_EXCEEDED"
    http_status = 504


class Cancelled(MunetError):
    code = "CANCELLED"
    http_status = 408  # the client is gone; nobody reads it


class Unauthenticated(MunetError):
    code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(MunetError):
    code = "PERMISSION_DENIED"
    http_status = 403


class ResourceExhausted(MunetError):
    code = "RESOURCE_EXHAUSTED"
    http_status = 429
