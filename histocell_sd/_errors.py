"""The one error type the package raises for bad input."""


class InvalidInputError(ValueError):
    """Input that does not fit the histocell-sd data model; the message names the element and the problem."""
