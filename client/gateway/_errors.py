"""Errors in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, with the
HTTP status of each of modelhost's error codes.

| modelhost error | HTTP | type |
| --- | --- | --- |
| bad_arguments, unknown_method, other request errors | 400 | invalid_request_error |
| unknown_model | 404 | invalid_request_error (code model_not_found) |
| payload_too_large | 413 | invalid_request_error |
| over_capacity | 429 | rate_limit_error |
| daemon_unavailable, daemon_crashed, insufficient_memory | 503 | server_error |
| broker_unavailable, request_lost, cancelled (by someone else) | 503 | server_error |
| timeout | 504 | timeout_error |
| engine_error, internal, anything else | 500 | server_error |
| protocol_mismatch, bad_message | 502 | server_error |
"""

import json

from .. import errors

_BY_CODE = {
    errors.UnknownModel.code: (404, "invalid_request_error", "model_not_found"),
    errors.PayloadTooLarge.code: (413, "invalid_request_error", "payload_too_large"),
    errors.OverCapacity.code: (429, "rate_limit_error", "over_capacity"),
    errors.InsufficientMemory.code: (503, "server_error", "insufficient_memory"),
    errors.Timeout.code: (504, "timeout_error", "timeout"),
    errors.ProtocolMismatch.code: (502, "server_error", "protocol_mismatch"),
    errors.BadMessage.code: (502, "server_error", "bad_message"),
}


class HTTPError(Exception):
    """An error response: raised anywhere in a request's handling, sent by the app."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self):
        return json.dumps({"error": {"message": self.message, "type": self.type,
                                     "param": self.param, "code": self.code}}).encode()


def from_modelhost(exc, param=None):
    """The HTTPError for a modelhost error (see the table above)."""
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    if code in _BY_CODE:
        status, type_, wire_code = _BY_CODE[code]
    elif isinstance(exc, errors.RequestError):
        status, type_, wire_code = 400, "invalid_request_error", code
    elif isinstance(exc, (errors.DaemonUnavailable, errors.DaemonCrashed,
                          errors.TransportError, errors.Cancelled)):
        status, type_, wire_code = 503, "server_error", code
    else:
        status, type_, wire_code = 500, "server_error", code
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return HTTPError(status, message, type_, param, wire_code, headers)


def bad_request(message, param=None, code=None):
    return HTTPError(400, message, "invalid_request_error", param, code)
