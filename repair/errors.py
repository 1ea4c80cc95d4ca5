"""One error hierarchy: each error knows its HTTP status, its OpenAI `type` and `code`, and a
dialect-neutral `kind` that each dialect maps to its own error shape in one place.

Kinds: invalid_request, unauthorized, not_found, too_large, overloaded, corrupted,
repair_failed, storage_full, timeout, server_error.
"""

import os


class LLMNodeError(Exception):
    """Root of every error llmnode reports to a client or an operator."""

    status = 500
    kind = "server_error"
    type = "server_error"
    code = "internal_error"
    retry_after = None

    def __init__(self, message=None):
        super().__init__(message or self.default_message())
        self.message = str(self.args[0])

    def default_message(self):
        return "Internal server error"

    def body(self):
        """The OpenAI dialect's error body."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


class InvalidRequest(LLMNodeError):
    status = 400
    kind = "invalid_request"
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidModelName(InvalidRequest):
    code = "invalid_model_name"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    """A parameter that would change the answer and that the node does not honour."""

    code = "unsupported_parameter"


class Unauthorized(LLMNodeError):
    status = 401
    kind = "unauthorized"
    type = "invalid_request_error"
    code = "unauthorized"


class RouteNotFound(LLMNodeError):
    status = 404
    kind = "not_found"
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(LLMNodeError):
    status = 404
    kind = "not_found"
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name):
        self.name = name
        super().__init__(
            "The model '%s' does not exist in the store; pull it with "
            "`python llmnode.py pull %s`" % (name, name)
        )


class MethodNotAllowed(LLMNodeError):
    status = 405
    kind = "invalid_request"
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(LLMNodeError):
    status = 413
    kind = "too_large"
    type = "invalid_request_error"
    code = "request_too_large"


class ModelLoadFailed(LLMNodeError):
    code = "model_load_failed"


class ModelBusy(LLMNodeError):
    """Every place in memory, or the model itself, stayed busy past the request's wait."""

    status = 503
    kind = "overloaded"
    code = "model_busy"
    retry_after = 5


class ManifestInvalid(LLMNodeError):
    """A manifest in the store or from a registry that is not a usable model manifest."""

    code = "manifest_invalid"


class ModelCorrupted(LLMNodeError):
    """A blob (or manifest) failed its check: `reason` says how (missing, size, header, digest),
    `bad_chunks` which chunk indices differ when a chunk table says, else None. A client sees
    it, naming the model, only when auto-repair is off."""

    status = 503
    kind = "corrupted"
    type = "model_corrupted"
    code = "model_corrupted"
    retry_after = 60

    def __init__(self, path, reason, bad_chunks=None, message=None):
        self.path = path
        self.reason = reason
        self.bad_chunks = bad_chunks
        super().__init__(message or "%s: %s" % (os.path.basename(path), reason))


class DownloadError(LLMNodeError):
    """Fetching from a registry failed; `cause` is the short reason after the colon."""

    status = 503
    kind = "repair_failed"
    type = "repair_failed"
    code = "model_repair_error"
    retry_after = 30
    cause = "network error"

    def __init__(self, detail=None, cause=None):
        self.cause = cause or self.cause
        self.detail = detail or self.cause
        super().__init__("Model repair failed: %s" % self.cause)

    def __str__(self):
        return "%s (%s)" % (self.cause, self.detail) if self.detail != self.cause else self.cause


class NetworkError(DownloadError):
    cause = "network error"


class RegistryHTTPError(DownloadError):
    """The registry answered with a status we cannot go on from."""

    def __init__(self, status_code, url):
        self.status_code = status_code
        self.url = url
        cause = {404: "model not found in registry", 401: "registry denied access",
                 403: "registry denied access"}.get(status_code, "registry error")
        super().__init__("HTTP %d from %s" % (status_code, url), cause=cause)


class DigestMismatch(DownloadError):
    """The bytes that arrived do not hash to the digest they were asked for by."""

    cause = "digest mismatch"

    def __init__(self, expected, actual):
        self.expected = expected
        self.actual = actual
        super().__init__("expected %s, got sha256:%s" % (expected, actual))


class BadRange(DownloadError):
    cause = "bad range response"


class RangesUnsupported(DownloadError):
    """The registry answered a ranged request with the whole blob; a parallel download falls
    back to one connection."""

    cause = "registry ignored a range request"


class InsufficientStorage(LLMNodeError):
    status = 507
    kind = "storage_full"
    type = "storage_full"
    code = "insufficient_storage"

    def default_message(self):
        return "Insufficient storage for model repair"


class RepairTimeout(LLMNodeError):
    status = 504
    kind = "timeout"
    type = "repair_timeout"
    code = "gateway_timeout"

    def default_message(self):
        return "Model repair timed out"


class RepairBusy(LLMNodeError):
    """Too many requests already wait on repairs; this one is turned away rather than queued."""

    status = 503
    kind = "overloaded"
    type = "repair_busy"
    code = "model_under_repair"
    retry_after = 10


class EngineFault(LLMNodeError):
    """An exception in the engine's step while it served this request: the request ends, the
    engine goes on (the traceback is in the node's log)."""

    code = "engine_fault"


class ClientGone(LLMNodeError):
    """The client closed its connection before its answer was done (nginx's 499): the answer
    is stopped, and nobody reads this error."""

    status = 499
    kind = "invalid_request"
    type = "invalid_request_error"
    code = "client_closed_request"
