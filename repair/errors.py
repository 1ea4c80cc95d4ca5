"""One error hierarchy; each error knows its HTTP status and its OpenAI error type and code."""


class LLMNodeError(Exception):
    """Root of every error llmnode reports to a client or an operator."""

    status = 500
    type = "server_error"
    code = "internal_error"
    retry_after = None

    def __init__(self, message=None):
        super().__init__(message or self.default_message())
        self.message = str(self.args[0])

    def default_message(self):
        return "Internal server error"

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


class InvalidRequest(LLMNodeError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidModelName(InvalidRequest):
    code = "invalid_model_name"


class Unauthorized(LLMNodeError):
    status = 401
    type = "invalid_request_error"
    code = "unauthorized"


class RouteNotFound(LLMNodeError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(LLMNodeError):
    status = 404
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
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(LLMNodeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ModelLoadFailed(LLMNodeError):
    code = "model_load_failed"


class ModelCorrupted(LLMNodeError):
    """The model's blob failed its check and auto-repair is off."""

    status = 503
    type = "model_corrupted"
    code = "model_corrupted"
    retry_after = 60


class DownloadError(LLMNodeError):
    """Fetching from a registry failed; `cause` is the short reason after the colon."""

    status = 503
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


class InsufficientStorage(LLMNodeError):
    status = 507
    type = "storage_full"
    code = "insufficient_storage"

    def default_message(self):
        return "Insufficient storage for model repair"


class RepairTimeout(LLMNodeError):
    status = 504
    type = "repair_timeout"
    code = "gateway_timeout"

    def default_message(self):
        return "Model repair timed out"


class RepairBusy(LLMNodeError):
    """Too many requests already wait on repairs; this one is turned away rather than queued."""

    status = 503
    type = "repair_busy"
    code = "model_under_repair"
    retry_after = 10
