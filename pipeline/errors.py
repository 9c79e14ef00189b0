"""The one exception type that stages raise for bad input; the CLI turns it into a clear message."""


class WysiwycError(Exception):
    """A user-facing error: the message names the input and says what to do."""


class InputError(WysiwycError):
    """One input item (an image, an annotation) is unusable; ingest may skip it and record why."""


class ImageTooLarge(InputError):
    """An image with more pixels than allowed (read from its header), or too large to decode safely."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name: what a message of
    ours quotes of a library's error."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
