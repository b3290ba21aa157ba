"""Which failed SSH handshakes the transport tries once more: those that ran out of time while
this process could not run (stopped, starved), never a refusal or a node that does not answer."""

from __future__ import annotations

import paramiko
import pytest

from ava.transport.ssh import _stalled


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (paramiko.AuthenticationException("Authentication timeout."), True),
        (paramiko.SSHException("Error reading SSH protocol banner"), True),
        (paramiko.SSHException("No existing session"), True),
        (paramiko.AuthenticationException("Authentication failed."), False),
        (paramiko.BadHostKeyException("h", paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)), False),
        (TimeoutError("timed out"), False),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (None, False),
    ],
)
def test_only_a_handshake_that_ran_out_of_time_is_tried_again(error: BaseException | None, retried: bool) -> None:
    assert _stalled(error) is retried
