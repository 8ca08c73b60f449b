"""Typed errors. Library code raises these; only the CLI turns them into text and exit codes.

Each carries a one-line message, a hint naming the fix, and a sysexits-style exit code.
"""

from __future__ import annotations

import inspect

EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class MeshnodeError(Exception):
    exit_code = EX_SOFTWARE
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_wire(self) -> dict[str, object]:
        """The error as plain data for the control socket (wire.ErrorInfo): `details` holds the
        constructor's further arguments (a KernelError's errno), so from_wire rebuilds it whole."""
        details = {name: value for name in _extra_params(type(self))
                   if isinstance(value := getattr(self, name, None), int | str | float)}
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint,
                "exit_code": self.exit_code, "details": details}


class UsageError(MeshnodeError):
    """Bad input from the user: an address, a name, an option."""

    exit_code = EX_USAGE


class ConfigError(MeshnodeError):
    exit_code = EX_CONFIG


class NotFoundError(MeshnodeError):
    """No such process, service or endpoint."""

    exit_code = EX_NOINPUT


class AccessError(MeshnodeError):
    """Not allowed: the operation needs root (or CAP_NET_ADMIN), or a root-only socket."""

    exit_code = EX_NOPERM
    default_hint = "run it as root (sudo meshnode ...)"


class UnavailableError(MeshnodeError):
    """A kernel feature, a tool or the agent is missing."""

    exit_code = EX_UNAVAILABLE


class AgentNotRunningError(UnavailableError):
    default_hint = "start it with: sudo meshnode agent"


class KernelError(MeshnodeError):
    """A kernel operation failed; keeps the errno."""

    exit_code = EX_OSERR

    def __init__(self, message: str, hint: str | None = None, errno: int | None = 0) -> None:
        super().__init__(message, hint)
        self.errno = errno or 0


class BpfError(KernelError):
    pass


class CaptureError(KernelError):
    pass


class CgroupError(KernelError):
    pass


class IptablesError(KernelError):
    pass


class RegistryError(MeshnodeError):
    exit_code = EX_DATAERR


class ConflictError(MeshnodeError):
    """The request contradicts current state (already enrolled, address taken)."""

    exit_code = EX_DATAERR


class TrustError(MeshnodeError):
    """A certificate, join token or trust bundle failed verification (the message says why)."""

    exit_code = EX_NOPERM


class TemporaryError(MeshnodeError):
    exit_code = EX_TEMPFAIL


class WireError(MeshnodeError):
    """A message on the control socket or the agent-worker channel could not be decoded."""

    exit_code = EX_PROTOCOL
    default_hint = "the two ends speak different versions: upgrade the CLI and the agent together"


class StateError(MeshnodeError):
    """A state file (ledger, enrollments, caches) cannot be written: the state directory is
    read-only, full, or not a directory. Keeps the errno."""

    exit_code = EX_CANTCREAT

    def __init__(self, message: str, hint: str | None = None, errno: int | None = 0) -> None:
        super().__init__(message, hint)
        self.errno = errno or 0


ERROR_TYPES: dict[str, type[MeshnodeError]] = {
    cls.__name__: cls
    for cls in (
        MeshnodeError, UsageError, ConfigError, NotFoundError, AccessError,
        UnavailableError, AgentNotRunningError, KernelError, BpfError, CaptureError,
        CgroupError, IptablesError, RegistryError, ConflictError, TemporaryError, StateError,
        TrustError,
        WireError,
    )
}


def _extra_params(cls: type[MeshnodeError]) -> tuple[str, ...]:
    """The constructor's arguments beyond message and hint (each kept as the same-named
    attribute, as KernelError keeps `errno`)."""
    params = inspect.signature(cls.__init__).parameters
    return tuple(name for name, p in params.items()
                 if name not in ("self", "message", "hint")
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def from_wire(data: dict[str, object]) -> MeshnodeError:
    """Rebuild an error the agent sent over the control socket, through its constructor (so a
    KernelError keeps its errno). An unknown type (a newer agent's) becomes a MeshnodeError with
    the same message, hint and exit code."""
    cls = ERROR_TYPES.get(str(data.get("type")), MeshnodeError)
    message, hint = str(data.get("message", "")), str(data.get("hint", ""))
    details = data.get("details")
    extra = ({name: details[name] for name in _extra_params(cls) if name in details}
             if isinstance(details, dict) else {})
    try:
        err = cls(message, hint, **extra)
    except (TypeError, ValueError):  # details of the wrong type: keep what can be kept
        err = MeshnodeError(message, hint)
    code = data.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool) and code != err.exit_code:
        err.exit_code = code
    return err
