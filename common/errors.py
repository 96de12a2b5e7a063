"""Errors the course tools raise for problems a user can fix; `effdl` prints them as one line."""


class EffdlError(Exception):
    """A problem with the user's input or machine, with a message that says what to do."""


class MissingDependencyError(EffdlError):
    """A tool the command needs (Marp CLI, Chromium, a Python package) is not installed."""
