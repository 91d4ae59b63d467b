"""The one exception type the workbench raises for user mistakes."""


class InterpError(ValueError):
    """Bad input or state: the message names the input and says what to do."""


class ForeignFilesError(InterpError):
    """An output folder holds files the workbench did not write; nothing in it was changed."""


class AdapterMismatchError(InterpError):
    """An adapter's config or weights do not fit the model it is loaded onto (keys, shapes, layers)."""
