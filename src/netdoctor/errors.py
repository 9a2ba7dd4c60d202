"""Errors the user caused (bad target, bad flag, bad data): reported as one line, exit code 2."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints `netdoctor: error: <message>` and exits 2."""
