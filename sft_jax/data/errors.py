"""The error every data reader raises for bad input."""


class DataError(ValueError):
    """Bad input data; the message starts with `file:line:` (or the data spec) and says what is wrong."""
