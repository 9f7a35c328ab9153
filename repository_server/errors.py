"""Errors the command line turns into an exit status (ConfigError lives in config.py)."""


class UsageError(Exception):
    """An option or argument is wrong or missing (a file that is not there, a value out of
    range): one line naming it, exit status 2, as argparse's own usage errors."""
