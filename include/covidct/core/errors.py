"""User-facing errors: the CLI prints their message, never a stack trace."""


class CovidctError(Exception):
    """A problem the user can fix (bad input, missing file, unavailable weights)."""

    #: True where trying again later may succeed by itself (a network outage, a server
    #: restarting): the scheduled DAG retries those; every other error fails at once.
    transient: bool = False


class ImageDecodeError(CovidctError):
    """An image file could not be decoded."""


class WeightsNotFoundError(CovidctError):
    """Pretrained weights were asked for but are neither local nor downloadable."""


class DownloadError(CovidctError):
    """A source file could not be downloaded (the message says why, ``transient`` whether to try later)."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient
