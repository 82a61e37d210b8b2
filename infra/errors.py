"""The laptop side's exceptions: UserError, the one type for bad user input (one line on stderr, exit
code 2), its two kinds that SSH work raises, and the argument parser that raises it instead of exiting."""

import argparse

from runspec import UserError  # the one type, shared with the trainer (see runspec)

__all__ = ["Parser", "UserError", "HostKeyMismatch", "ConnectionLost"]


class HostKeyMismatch(UserError):
    pass


class ConnectionLost(UserError):
    """The SSH connection dropped; whatever was started detached on the machine goes on."""


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no abbreviations: unknown flags go on to the trainer, so `--seed` must never become `--seeds`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")
