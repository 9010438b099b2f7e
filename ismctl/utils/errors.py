"""The one exception type for bad user input; the CLI turns it into one line and exit 2."""


class UserError(Exception):
    """Bad input (recipe, path, data): the message names what is wrong and where."""
