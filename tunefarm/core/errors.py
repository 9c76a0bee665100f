"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class TunefarmError(Exception):
    """A user-facing failure: bad input, unreachable tracker, no device for a key, ...

    The message is printed as one line (no traceback) by the CLI, which exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TrackerUnreachable(TunefarmError):
    """The tracker address does not answer with the TVM tracker protocol."""


class AgentUnreachable(TunefarmError):
    """The tracker handed out an agent whose address this host cannot connect to (NAT, firewall, wrong
    advertised address)."""

    def __init__(self, message: str, host: str = "", port: int = 0):
        super().__init__(message)
        self.host, self.port = host, port


class NoDeviceError(TunefarmError):
    """No agent serves the requested key (after waiting)."""


class AgentsBusy(TunefarmError):
    """Agents serve the key, but none became free for this request within its wait (the request is withdrawn)."""


class TuningFailed(TunefarmError):
    """The job ran but its result is not acceptable (numerics, tuned slower than untuned, ...)."""

    exit_code = 3


def _lines(err: BaseException | str) -> list[str]:
    return [line.strip() for line in str(err).strip().splitlines() if line.strip()]


def first_line(err: BaseException | str) -> str:
    """The first non-empty line of an error's text (where TVM's target parser puts the cause)."""
    lines = _lines(err)
    return lines[0] if lines else (type(err).__name__ if isinstance(err, BaseException) else "")


def last_line(err: BaseException | str) -> str:
    """The last non-empty line of an error's text (where a TVM FFI error puts its message, after the
    C++ backtrace)."""
    lines = _lines(err)
    return lines[-1] if lines else (type(err).__name__ if isinstance(err, BaseException) else "")
