"""The few error types ava raises. The CLI turns each into one line and an exit code."""

from __future__ import annotations

# Exit codes, as DESIGN.md fixes them.
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_INFRA = 3
EXIT_INTERRUPTED = 130


class AvaError(Exception):
    """Base of every error a user may see; its message is one line naming file, key or node."""

    exit_code = EXIT_INFRA

    def __init__(self, message: str, *, tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        # A few last lines of a failed command's output, shown under the one-line message.
        self.tail = tail


class ConfigError(AvaError):
    """A bad inventory, recipe or command-line value: `FILE: dotted.key: problem`."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, key: str, problem: str) -> None:
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)
        self.source, self.key, self.problem = source, key, problem


class UsageError(AvaError):
    exit_code = EXIT_USAGE


class ConnectError(AvaError):
    """A node could not be reached; `reason` is plain words ("connection refused")."""

    def __init__(self, node: str, address: str, reason: str) -> None:
        super().__init__(f"{node} ({address}): {reason}")
        self.node, self.address, self.reason = node, address, reason


class CommandError(AvaError):
    """A command on a node exited non-zero where ava needed it to succeed."""
