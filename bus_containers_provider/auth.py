"""Bearer-token verification (HS256 through joserfc, authlib's JOSE library) and the route guard."""
import functools
import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

from flask import current_app, g, request
from joserfc import jwt
from joserfc.errors import InvalidClaimError, JoseError
from joserfc.jwk import OctKey

from .config import INTERNAL_AUDIENCE, PUBLIC_AUDIENCE
from .errors import Forbidden, InvalidAuth

MAX_TOKEN_BYTES = 8 * 1024
IAT_SKEW_SECONDS = 60
ALGORITHMS = ["HS256"]
# Headers that point at keys elsewhere or demand extensions we do not implement.
REFUSED_HEADERS = frozenset({"crit", "jwk", "jku", "x5u", "x5c"})
AUDIENCES = frozenset({PUBLIC_AUDIENCE, INTERNAL_AUDIENCE})


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account is the token's sub, never anything in the request."""

    account: str
    scopes: frozenset


# RFC 7519 NumericDate, as CONTRACT §2 pins it: a JSON number (never a bool or a string), finite,
# and below 2^53 so that it is an exact integer in every JSON reader. 1e300 is a number, and a
# token that never expires; NaN compares false to everything, and would never expire either.
MAX_NUMERIC_DATE = 2 ** 53


def _numeric_date(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidClaimError(name, f"Claim {name!r} must be a NumericDate")  # pragma: no mutate
    # The range check comes first: math.isfinite raises OverflowError for a huge int.
    if not -MAX_NUMERIC_DATE < value < MAX_NUMERIC_DATE or not math.isfinite(value):
        raise InvalidClaimError(name, f"Claim {name!r} is out of range")  # pragma: no mutate
    return value


class _Claims(jwt.JWTClaimsRegistry):
    """exp and nbf are strict; iat may run ahead of our clock by IAT_SKEW_SECONDS; every date is a NumericDate."""

    def validate_exp(self, value):
        super().validate_exp(_numeric_date("exp", value))

    def validate_nbf(self, value):
        super().validate_nbf(_numeric_date("nbf", value))

    def validate_iat(self, value):
        if _numeric_date("iat", value) > self.now + IAT_SKEW_SECONDS:
            raise InvalidClaimError("iat", "The token was issued in the future")  # pragma: no mutate


class TokenVerifier:
    """Verifies compact HS256 tokens for one audience at a time."""

    def __init__(self, secret: bytes, clock=time.time):
        self._key = OctKey.import_key(secret)
        # Claim checks are opt-in in joserfc: every claim we rely on is essential.
        self._claims = _Claims(now=lambda: int(clock()),
                               **{name: {"essential": True} for name in ("sub", "aud", "exp", "iat")})
        self._verified = VerifiedTokens(clock=clock)

    def verify(self, token: str, audience: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidAuth("bearer token is too large")  # pragma: no mutate
        principal = self._verified.get(token, audience)
        if principal is not None:
            return principal
        try:
            decoded = jwt.decode(token, self._key, algorithms=ALGORITHMS)
            header, claims = decoded.header, decoded.claims
            self._claims.validate(claims)
        except (JoseError, ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
            # Malformed input surfaces as plain Python errors too; all of it is a bad token.
            raise InvalidAuth("bearer token is invalid or expired") from None  # pragma: no mutate
        if REFUSED_HEADERS & set(header) or header.get("alg") not in ALGORITHMS:
            raise InvalidAuth("bearer token header is not accepted")  # pragma: no mutate
        principal = Principal(_subject(claims), _scopes(claims, audience))
        self._verified.put(token, audience, principal, claims["exp"])
        return principal


class VerifiedTokens:
    """Tokens that passed every check, remembered until their exp: a caller's next request skips the checks.

    Bounded (the oldest entry goes first), keyed by the whole token and the
    audience it was checked for, and an entry is never used at or after the
    token's exp. Only successes are kept: a refused token is checked in full
    every time. The secret is fixed for the verifier's life, so the same
    token always verifies to the same Principal.
    """

    SIZE = 1024

    def __init__(self, size: int = SIZE, clock=time.time):
        self._size = size
        self._clock = clock
        self._entries = {}  # (token, audience) -> (exp, Principal); dict order is insertion order
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    def get(self, token: str, audience: str):
        key = (token, audience)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self._clock() < entry[0]:
            with self._lock:  # put() drops the oldest under the same lock: never both at once
                self._entries.pop(key, None)
            return None
        return entry[1]

    def put(self, token: str, audience: str, principal: Principal, exp) -> None:
        # Only a plain number below 2^53 (so never NaN, infinity or a huge int) is worth remembering.
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not exp < MAX_NUMERIC_DATE:
            return
        with self._lock:
            self._entries[(token, audience)] = (exp, principal)
            while len(self._entries) > self._size:
                del self._entries[next(iter(self._entries))]


def _subject(claims) -> str:
    sub = claims.get("sub")
    # " alice" must not be a second account beside "alice": no padding, no empty ids.
    if not isinstance(sub, str) or not sub or sub != sub.strip():
        raise InvalidAuth("bearer token has no valid subject")  # pragma: no mutate
    return sub


def _scopes(claims, audience) -> frozenset:
    aud = claims.get("aud")
    audiences = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else None
    if not audiences or not all(isinstance(a, str) for a in audiences):
        raise InvalidAuth("bearer token audience is malformed")  # pragma: no mutate
    # One token, one trust zone: a token for both zones is trusted in neither.
    if AUDIENCES <= audiences or audience not in audiences:
        raise InvalidAuth("bearer token is not for this audience")  # pragma: no mutate
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise InvalidAuth("bearer token scope must be a space-separated string")  # pragma: no mutate
    return frozenset(scope.split())


def mint_token(secret: bytes, subject: str, scope: str, audience: str = PUBLIC_AUDIENCE,
               ttl: float = 3600, now: float = None) -> str:
    """A compact HS256 token for local development and tests."""
    issued = int(time.time() if now is None else now)
    claims = {"sub": subject, "aud": audience, "scope": scope, "iat": issued, "exp": issued + int(ttl)}
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, OctKey.import_key(secret))


def _bearer() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidAuth("missing bearer token")  # pragma: no mutate
    return token.strip()


def requires(scope: Optional[str], audience: str = PUBLIC_AUDIENCE):
    """Route guard: a valid token for `audience` (else 401) holding `scope` (else 403); None: any scope."""

    def decorator(view):
        @functools.wraps(view)
        def guarded(*args, **kwargs):
            verifier = current_app.extensions["bus_containers"].verifier
            principal = verifier.verify(_bearer(), audience)
            if scope is not None and scope not in principal.scopes:
                raise Forbidden(f"the token lacks the {scope} scope")
            g.principal = principal
            return view(*args, **kwargs)

        return guarded

    return decorator
