"""The error classes of replicator.

Every error the tool reports to an operator derives from `ReplicatorError`. A class's
docstring is its default message; each carries the exit code a command returns for it
and whether it is transient (wait and retry: a network failure, a peer restarting) or
permanent (a bad configuration, a refused promotion).
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """replicator failed."""

    exit_code = 2
    transient = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(ReplicatorError):
    """The configuration is invalid."""


class UsageError(ReplicatorError):
    """The command line is invalid."""


class CheckFailed(ReplicatorError):
    """A check failed."""

    exit_code = 1


class PromotionRefused(ReplicatorError):
    """Promotion refused: the mirror is not consistent."""

    exit_code = 3


class ProtocolError(ReplicatorError):
    """The peer broke the protocol."""


class PathRefused(ProtocolError):
    """A path from the wire is not a safe relative path."""


class DigestMismatch(ReplicatorError):
    """A file's digest after applying does not match the digest that was sent."""


class Fenced(ReplicatorError):
    """The source is fenced: its mirror has been promoted."""


class SourceUnsafe(ReplicatorError):
    """A dataset's source looks unmounted, vanished or emptied; shipping stopped."""

    transient = True


class StateUnwritable(ReplicatorError):
    """The agent cannot write its own state (its disk is full or failing); shipping paused."""

    transient = True


class PeerUnavailable(ReplicatorError):
    """The peer cannot be reached."""

    transient = True
