"""The provider's own Events API token: fixed (BUS_API_TOKEN), or a file read again when it changes.

The Bus dispatcher hands its commands BUS_EVENTS_TOKEN_FILE, and a rotated
token is written into that file. Whether it changed is asked on use, at
most once per CHECK_SECONDS (a stat, no thread), and at once when the
Events API refuses the token. A failed read keeps the last good token: a
file caught half-written must not cost the requests in flight theirs.
"""
import logging
import os
import re
import threading
import time
from typing import Tuple

log = logging.getLogger(__name__)

VARIABLE = "BUS_EVENTS_TOKEN_FILE"
CHECK_SECONDS = 1.0
# Far above any bearer token; a path to something else (a log, /dev/zero) is refused, not read whole.
MAX_BYTES = 64 * 1024
# A bearer token is one word of visible ASCII; anything else would be a broken or forged header.
_ONE_TOKEN = re.compile(rb"[!-~]+")


class TokenFileError(ValueError):
    """The token file cannot be read, or does not hold one token."""


def read_token_file(path: str) -> str:
    """The token in `path`, surrounding white space dropped; messages name the file, never its content."""
    try:
        with open(path, "rb") as file:
            content = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(content) > MAX_BYTES:
        raise TokenFileError(f"{path} is larger than {MAX_BYTES} bytes, too large for a token")
    token = content.strip()
    if not token:
        raise TokenFileError(f"{path} is empty")
    if not _ONE_TOKEN.fullmatch(token):
        raise TokenFileError(f"{path} must hold one token: no white space or control characters inside it")
    return token.decode("ascii")


class StaticToken:
    """A token that never changes."""

    generation = 0

    def __init__(self, token: str):
        self._token = token

    def value(self) -> str:
        return self._token

    def reread(self) -> str:
        return self._token


class TokenFile:
    """The token held in a file; `generation` counts the changes of the token read from it."""

    def __init__(self, path: str, check_seconds: float = CHECK_SECONDS, clock=time.monotonic):
        self.path = path
        self.generation = 0
        self._check_seconds = check_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._token, self._signature, self._problem = "", None, None
        self._next_check = 0.0
        # Read once here; start-up validation has checked the file, so a failure is a rotation caught midway.
        self.reread()

    def __repr__(self):
        return f"TokenFile({self.path!r})"  # never the token

    def value(self) -> str:
        """The current token; at most once per check interval, the file's stat is compared first."""
        if self._clock() >= self._next_check:
            self._check(force=False)
        return self._token

    def reread(self) -> str:
        """Read the file now (the Events API refused the token we hold) and return the token."""
        self._check(force=True)
        return self._token

    def _check(self, force: bool) -> None:
        with self._lock:
            self._next_check = self._clock() + self._check_seconds
            try:
                # Taken before the read: a write landing between the two is seen as a change next time.
                signature = _signature(self.path)
                if signature == self._signature and not force:
                    return
                token = read_token_file(self.path)
            except TokenFileError as exc:
                self._failed(str(exc))
                return
            self._signature, self._problem = signature, None
            if token != self._token:
                if self._token:
                    log.info("read a new Events API token from %s (%s)", self.path, VARIABLE)
                self._token, self.generation = token, self.generation + 1

    def _failed(self, problem: str) -> None:
        # Once per distinct problem: the file is asked every second and on every refusal.
        if problem != self._problem:
            log.error("%s: %s; the token read before it, if any, stays in use", VARIABLE, problem)
        self._problem = problem


def _signature(path: str) -> Tuple[int, int, int, int]:
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise TokenFileError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def events_token(settings):
    """The token source the settings name: the file when one is set (it wins), else the variable."""
    if settings.events_token_file:
        return TokenFile(settings.events_token_file)
    return StaticToken(settings.api_token or "")
