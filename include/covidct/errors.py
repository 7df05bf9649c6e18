"""User-facing errors: the CLI prints their message, never a stack trace."""


class CovidctError(Exception):
    """A problem the user can fix (bad input, missing file, unavailable weights)."""


class ImageDecodeError(CovidctError):
    """An image file could not be decoded."""


class WeightsNotFoundError(CovidctError):
    """Pretrained weights were asked for but are neither local nor downloadable."""
