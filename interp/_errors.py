"""The one exception type the workbench raises for user mistakes."""


class InterpError(ValueError):
    """Bad input or state: the message names the input and says what to do."""
