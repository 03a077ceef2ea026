"""The Prefer request header (RFC 7240) as runs read it: respond-async and wait=N.

Preferences the provider does not know, and malformed ones, are ignored
(RFC 7240 §2); of a preference given more than once, the first counts.
"""
from dataclasses import dataclass
from typing import Iterable, Optional

from werkzeug.http import parse_list_header


@dataclass(frozen=True)
class Preferences:
    respond_async: bool = False
    wait: Optional[int] = None  # seconds, as asked (the caller grants at most --max-wait)


NONE = Preferences()


def parse_prefer(values: Iterable[str]) -> Preferences:
    """Preferences from every Prefer header of a request."""
    seen, respond_async, wait = set(), False, None
    for value in values:
        for preference in parse_list_header(value):
            # Parameters (after ";") of these two preferences mean nothing: ignored.
            token = preference.split(";", 1)[0]
            name, equals, argument = token.partition("=")
            name, argument = name.strip().lower(), argument.strip().strip('"')
            if name in seen:
                continue
            seen.add(name)
            if name == "respond-async" and not equals:
                respond_async = True
            elif name == "wait" and argument.isascii() and argument.isdigit():
                wait = int(argument)
    return Preferences(respond_async, wait)
