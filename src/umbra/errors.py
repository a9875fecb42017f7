"""The umbra exception hierarchy and its exit codes.

Every error a user can cause or fix is an :class:`UmbraError`: its class docstring's first line is
the message template (filled with ``str.format`` from the keyword arguments), its ``exit_code`` is the
process exit status, and ``show_traceback`` is false.  Only ``umbra.cli.main`` catches these; any
other exception is a bug and is printed with a traceback (exit code 3).

The table of exit codes is in ``docs/ERRORS.md``; ``tests/test_errors.py`` checks that codes are
unique and that every class has a message.
"""

from __future__ import annotations

import errno as errno_mod
from typing import Any, ClassVar

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class UmbraError(Exception):
    """{message}"""

    exit_code: ClassVar[int] = 4
    show_traceback: ClassVar[bool] = False
    errno: ClassVar[int] = errno_mod.EIO

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.fields = fields
        if message is None:
            template = (type(self).__doc__ or "{message}").strip().splitlines()[0]
            try:
                message = template.format(**fields)
            except (KeyError, IndexError):
                message = template
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(UmbraError):
    """{message}"""

    exit_code = 5


# --- repository ------------------------------------------------------------------------------


class RepositoryError(UmbraError):
    """repository error: {message}"""

    exit_code = 10


class RepositoryNotFound(RepositoryError):
    """no umbra repository at {location} (create one with 'umbra init')"""

    exit_code = 11


class RepositoryExists(RepositoryError):
    """{location} already exists and is not empty; refusing to initialise a repository there"""

    exit_code = 12


class RepositoryLocked(RepositoryError):
    """repository is locked by {holder}; try again later (a stale lock is removed automatically)"""

    exit_code = 13


class LockLost(RepositoryError):
    """the repository lock of this process was lost ({reason}); aborted without writing a point"""

    exit_code = 14


class WrongPassphrase(RepositoryError):
    """wrong passphrase: no key of this repository opens with it"""

    exit_code = 15


class PassphraseMissing(RepositoryError):
    """this repository is encrypted: set UMBRA_PASSWORD, UMBRA_PASSWORD_FILE or UMBRA_PASSWORD_COMMAND"""

    exit_code = 16


class KeyProblem(RepositoryError):
    """key problem: {message}"""

    exit_code = 17


class IntegrityError(RepositoryError):
    """repository data is corrupt: {message}"""

    exit_code = 18


class UnsupportedFormat(RepositoryError):
    """{message}: this version of umbra reads repository format {supported}"""

    exit_code = 19


class RepositoryIOError(RepositoryError):
    """repository I/O error on {name}: {reason}"""

    exit_code = 20


class RepositoryFull(RepositoryIOError):
    """repository storage is full while writing {name}: free space, then run the backup again"""

    exit_code = 21
    errno = errno_mod.ENOSPC


class ServerAccessDenied(RepositoryError):
    """the backup server at {location} refused access: {reason}"""

    exit_code = 28


class CheckFailed(RepositoryError):
    """check found {count} problem(s) in the repository"""

    exit_code = 22


class PackNotVerified(RepositoryError):
    """a new pack did not read back before it was stored ({reason}): suspect memory or CPU; nothing was stored"""

    exit_code = 27


class ObjectMissing(RepositoryError):
    """object {name} is missing from the repository"""

    exit_code = 25


class PointNotFound(RepositoryError):
    """no point matches {ref!r}"""

    exit_code = 23


class InstantInGap(PointNotFound):
    """no state of {volume} at {time}: its journal lacks the writes from {since} to {until} ({reason}); {hint}"""

    exit_code = 26


class AmbiguousPoint(RepositoryError):
    """point id prefix {ref!r} is ambiguous: it matches {count} points"""

    exit_code = 24


# --- sources and targets ---------------------------------------------------------------------


class SourceError(UmbraError):
    """cannot read source {path}: {reason}"""

    exit_code = 30


class SourceReadError(SourceError):
    """read error on source {path} at offset {offset}: {reason}"""

    exit_code = 31


class TargetError(UmbraError):
    """cannot restore to {path}: {reason}"""

    exit_code = 32


class TargetTooSmall(TargetError):
    """target {path} has {size} bytes but the point needs {needed}; use a larger target"""

    exit_code = 33


class TargetBusy(TargetError):
    """target {path} is {reason}; unmount it first (or --force)"""

    exit_code = 34
    errno = errno_mod.EBUSY


# --- shadow copy service ---------------------------------------------------------------------


class ProviderError(UmbraError):
    """snapshot provider {provider} cannot snapshot {volume}: {reason}"""

    exit_code = 40


class WriterError(UmbraError):
    """writer {writer}: {reason}"""

    exit_code = 41


class WriterVeto(WriterError):
    """writer {writer} refused to freeze: {reason}"""

    exit_code = 44

    def __init__(self, writer: str, reason: str, retryable: bool = False) -> None:
        super().__init__(writer=writer, reason=reason)
        self.retryable = retryable


class CoordinatorTimeout(UmbraError):
    """snapshot set aborted: {phase} took longer than its limit of {limit} s"""

    exit_code = 42


class SnapshotSetFailed(UmbraError):
    """snapshot set aborted in phase {phase}: {reason}; nothing was kept"""

    exit_code = 43


# --- protected volumes -----------------------------------------------------------------------


class ProtectError(UmbraError):
    """protected volume {volume}: {reason}"""

    exit_code = 50


class VolumeBusy(SourceError):
    """{path} is busy: {reason}"""

    exit_code = 51
    errno = errno_mod.EBUSY


class DifferenceStoreFull(ProtectError):
    """difference store full ({used} of {limit} bytes)"""

    exit_code = 52
    errno = errno_mod.ENOSPC


class SnapshotFailed(ProtectError):
    """snapshot {name} of {volume} failed: {reason}"""

    exit_code = 53


class JournalCorrupt(ProtectError):
    """journal {path} is damaged at offset {offset}: {reason}"""

    exit_code = 54


class DaemonUnavailable(ProtectError):
    """volume {volume} is not being protected (nothing answers at {socket}); start `umbra protect`"""

    exit_code = 55


# --- serving points and volumes (export, mount) -------------------------------------------------


class ServeError(UmbraError):
    """cannot serve {name}: {reason}"""

    exit_code = 60


class FileSystemError(UmbraError):
    """{point}: {reason}"""

    exit_code = 61


class ExtractError(UmbraError):
    """cannot extract {path}: {reason}"""

    exit_code = 62


class VerifyFailed(UmbraError):
    """{ref}: the {filesystem} filesystem does not check clean ({command} exited with {code})"""

    exit_code = 63


def all_error_classes() -> list[type[UmbraError]]:
    """Every UmbraError subclass, depth first, the base included."""
    out: list[type[UmbraError]] = []
    stack: list[type[UmbraError]] = [UmbraError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return out
