"""The one exception type that reaches users as a one-line message."""


class PersonatuneError(Exception):
    """A user-facing error: bad input, missing file, impossible setting.

    The CLI prints ``error: <message>`` on one line and exits with status 2. The message
    names the file, row or key at fault and says how to fix it.
    """
