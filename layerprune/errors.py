"""The one exception type for user errors: the CLI prints it as a single line."""


class LayerpruneError(Exception):
    """Bad input or an impossible request; carries a one-line message for the user."""
