"""The one exception type the library raises for problems a user can fix."""


class EFTError(Exception):
    """A user-facing error: bad input, incompatible models, a prompt that does not fit.

    The message is one line that says what is wrong; the CLI prints it as ``error: ...``.
    """


class UnavailableError(EFTError):
    """Something the models run on is gone for now (an RPC server): the same request may work later.

    The server answers it with 503 rather than 400.
    """
