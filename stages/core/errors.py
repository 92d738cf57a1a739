"""The one exception type that reaches the user as a single line, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message says what is wrong and what to do."""
