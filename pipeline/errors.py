"""The one exception type that stages raise for bad input; the CLI turns it into a clear message."""


class WysiwycError(Exception):
    """A user-facing error: the message names the input and says what to do."""


class InputError(WysiwycError):
    """One input item (an image, an annotation) is unusable; ingest may skip it and record why."""


class ImageTooLarge(InputError):
    """An image with more pixels than allowed (read from its header), or too large to decode safely."""
