"""Errors shared by the whole package."""


class UserError(Exception):
    """An error in the user's input: printed as one line, no traceback."""
