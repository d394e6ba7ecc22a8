"""One exception family for the whole system, each class tied to one gRPC status code name.

The servicer maps a `PSError` to its status code once; the client maps the code (and the class
name carried in trailing metadata) back to the same class. Nothing matches on message text.
"""

from __future__ import annotations


class PSError(Exception):
    """Base of every error ps raises on purpose."""

    code = "INTERNAL"


class InvalidArgument(PSError):
    """A request is malformed: wrong shape, dtype, byte length, NaN, bad flag value."""

    code = "INVALID_ARGUMENT"


class UnknownKey(PSError):
    """A request names a parameter slice this shard does not hold."""

    code = "NOT_FOUND"


class UnknownTable(PSError):
    """A request names an embedding table this shard was never told of (declare it: InitTables)."""

    code = "NOT_FOUND"


class PlanMismatch(PSError):
    """The worker's sharding plan (or optimizer) differs from the one the servers hold."""

    code = "FAILED_PRECONDITION"


class NotInitialized(PSError):
    """The shard has no parameters yet: a worker must call init first."""

    code = "FAILED_PRECONDITION"


class UnknownWorker(PSError):
    """The worker is not registered (never was, left, or was evicted): register again."""

    code = "FAILED_PRECONDITION"


class StepConflict(PSError):
    """A push names a clock the server cannot take (e.g. a sync step in the future)."""

    code = "FAILED_PRECONDITION"


class ShmUnavailable(PSError):
    """Shared memory cannot be used between this worker and server (not the same host, PID
    namespace or user, no memory for the segment, or the server does not offer it): the stream
    path carries the bytes."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(PSError):
    """Missing or wrong credentials."""

    code = "UNAUTHENTICATED"


class Unavailable(PSError):
    """The server could not be reached (down, restarting, or the network is cut)."""

    code = "UNAVAILABLE"


class DeadlineExceeded(PSError):
    """A call took longer than its deadline."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(PSError):
    """A message is larger than the configured limit."""

    code = "RESOURCE_EXHAUSTED"


class Overloaded(PSError):
    """The server is at its bound on requests in flight: retry later, with backoff."""

    code = "RESOURCE_EXHAUSTED"


class Cancelled(PSError):
    """The call was cancelled (the client went away or the server is stopping)."""

    code = "CANCELLED"


ERROR_CLASSES: dict[str, type[PSError]] = {
    cls.__name__: cls
    for cls in (
        PSError,
        InvalidArgument,
        UnknownKey,
        UnknownTable,
        PlanMismatch,
        NotInitialized,
        UnknownWorker,
        StepConflict,
        ShmUnavailable,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        ResourceExhausted,
        Overloaded,
        Cancelled,
    )
}

# The class a bare status code (one without our metadata, e.g. from gRPC itself) maps to.
CODE_CLASSES: dict[str, type[PSError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": UnknownKey,
    "FAILED_PRECONDITION": PlanMismatch,
    "UNAUTHENTICATED": Unauthenticated,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "CANCELLED": Cancelled,
}


def error_from_wire(code_name: str, class_name: str | None, message: str) -> PSError:
    """Rebuild the exception a server raised from its status code and class name."""
    cls = ERROR_CLASSES.get(class_name or "") or CODE_CLASSES.get(code_name, PSError)
    return cls(message)
