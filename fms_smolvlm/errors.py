"""Errors as users read them: one line each."""

# how Python chains a cause into a traceback's text (Ray hands remote failures over as such text)
_CHAINED = "The above exception was the direct cause of the following exception"


def one_line(error: BaseException, with_type: bool = False) -> str:
    """The error's message on one line (its type's name when it has none; ``with_type``: ``Type: message``).

    A failure in a Ray worker reaches the caller as the worker's traceback text, the original exception first and
    Ray's wrappers after it: then the original's last line, ``Type: message``, is the message.
    """
    text = str(error).split(_CHAINED)[0]
    if '  File "' in text:
        return [line.strip() for line in text.splitlines() if line.strip()][-1][:500]
    message = " ".join(text.split())[:500] or type(error).__name__
    return f"{type(error).__name__}: {message}" if with_type else message
