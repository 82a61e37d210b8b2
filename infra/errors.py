"""Bad user input on the laptop side: the one exception type (one line on stderr, exit code 2), and the
argument parser that raises it instead of exiting."""

import argparse

from runspec import UserError  # the one type, shared with the trainer (see runspec)

__all__ = ["Parser", "UserError"]


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no abbreviations: unknown flags go on to the trainer, so `--seed` must never become `--seeds`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")
