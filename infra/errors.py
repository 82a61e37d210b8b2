"""The laptop side's exceptions: UserError, the one type for bad user input (one line on stderr, exit
code 2), and its two kinds that SSH work raises."""


from runspec import UserError  # the one type, shared with the trainer (see runspec)

__all__ = ["UserError", "HostKeyMismatch", "ConnectionLost"]


class HostKeyMismatch(UserError):
    pass


class ConnectionLost(UserError):
    """The SSH connection dropped; whatever was started detached on the machine goes on."""
