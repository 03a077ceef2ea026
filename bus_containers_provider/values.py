"""How Bus components write durations and booleans: one parser each, for every flag and variable.

Durations follow Go's time.ParseDuration, which every other Bus component
uses. durationpy, the usual Python reading of it, also takes units Go
refuses (`d`, `w`, `y`) and text between the parts, so an operator's `1d`
would start here and fail in the next component: one anchored pattern
keeps the grammar exactly Go's.
"""
import re

DURATION_SYNTAX = ("Go's duration syntax (1500ms, 30s, 1m30s, 1.5h, 2h45m30.5s; units ns, us, ms, s, m, h) "
                   "or a bare number of seconds")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BOOLEAN_SYNTAX = f"{', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)} (any case)"

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# ASCII digits only: \d would also take other scripts' digits, which float() reads and Go refuses.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
# Longer units first, so `ms` is never read as `m` followed by an `s` without a number.
_UNIT = "|".join(sorted(map(re.escape, _UNIT_SECONDS), key=len, reverse=True))
_PART = re.compile(rf"({_NUMBER})({_UNIT})")
_DURATION = re.compile(rf"\+?(?:(?:{_NUMBER}(?:{_UNIT}))+|{_NUMBER})")
# Go's durations are int64 nanoseconds: nothing longer exists in the other Bus components.
MAX_SECONDS = (2 ** 63 - 1) / 1e9


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (`1h30m`, `1.5h`, `300ms`) or a bare number of seconds; never negative."""
    value = str(text).strip()
    if value.startswith("-"):
        raise ValueError(f"{text!r} is negative: use a duration of zero or more in {DURATION_SYNTAX}")
    if not _DURATION.fullmatch(value):
        raise ValueError(f"{text!r} is not a duration: use {DURATION_SYNTAX}")
    parts = _PART.findall(value)
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts) if parts else float(value)
    if seconds > MAX_SECONDS:
        raise ValueError(f"{text!r} is longer than the longest duration Bus components accept (about 292 years)")
    return seconds


def parse_bool(text: str) -> bool:
    """The Bus reading of a switch; anything but the listed words is refused, never taken as off."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean: use {BOOLEAN_SYNTAX}")
