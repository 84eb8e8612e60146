"""Domain errors raised by the core modules.

The core (paths, chunks, annotations) knows nothing of HTTP; it raises these, each with the
status of its class, and ``neurotrale_twisted.web.responses`` (``error_status``,
``error_answer``) turns each into that status code and a JSON body
``{"error": message, "status": code}``. Nothing else in the code writes error responses.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a client can be told about; ``status`` is its HTTP status."""

    status: int = 500

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: What the log may say and the client may not (an absolute path, the system's error).
        self.detail = detail


class BadRequest(DomainError):
    """The request itself is malformed: bad JSON, a bad record, a bad name (400)."""

    status = 400


class Forbidden(DomainError):
    """The request names something it may never touch (403)."""

    status = 403


class NotFound(DomainError):
    """The thing asked for does not exist, or must be treated as absent (404)."""

    status = 404


class MethodNotAllowed(DomainError):
    """The resource exists but does not take this method (405)."""

    status = 405


class PreconditionFailed(DomainError):
    """An ``If-Match`` no longer matches the stored file (412)."""

    status = 412


class PayloadTooLarge(DomainError):
    """A request body is over the configured limit (413)."""

    status = 413


class ServerError(DomainError):
    """The data on disk is inconsistent (a chunk whose shape disagrees with ``info``) (500).

    The message names the file so that the operator can find it in the log.
    """

    status = 500


class StorageFull(DomainError):
    """The disk is full or the quota is spent: nothing was written (507)."""

    status = 507


class Unavailable(DomainError):
    """The server cannot do it now (too many writers at once); try again (503)."""

    status = 503
