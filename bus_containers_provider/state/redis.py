"""The Redis store (--state-url): run controls shared by every provider process that points at it.

Same semantics as memory.py, made atomic by small registered Lua scripts, in
the shape of redis-py's Lock: a lease is a key or a sorted-set member with an
expiry, and nobody renews, finishes or drops what another run holds. Lease
expiry is reckoned on the server's clock (TIME, PX), so the clocks of the
provider hosts never matter.
"""
import contextlib
import json
import logging

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import StateUnavailable
from .base import IN_FLIGHT, Claim

log = logging.getLogger(__name__)

PREFIX = "bus:containers:"
# A store that is down must turn runs away with a 503 at once, not hold their
# request threads: Redis answers these scripts in well under a millisecond, so
# a second without an answer means it is not going to answer. A URL query
# (?socket_timeout=…&socket_connect_timeout=…) overrides both.
CONNECT_TIMEOUT = 0.5
SOCKET_TIMEOUT = 1.0
# A pooled connection idle this long is pinged before use, so one the server
# has dropped is replaced instead of failing a run.
HEALTH_CHECK_SECONDS = 15

# ms since the epoch on the server's clock, for the scripts that score leases.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] record; ARGV[1] the new in-flight record, ARGV[2] lease ms.
# nil when the record was created, else the record that exists.
CLAIM_KEY = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
"""

# KEYS[1] record; ARGV[1] run_id, ARGV[2] answer JSON, ARGV[3] ttl ms.
# The answer is spliced in as sent: decoding and re-encoding it with cjson
# would turn an empty list into an empty object.
FINISH_KEY = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record.run_id ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], '{"state":"done","fingerprint":' .. cjson.encode(record.fingerprint) ..
  ',"run_id":' .. cjson.encode(record.run_id) .. ',"answer":' .. ARGV[2] .. '}', 'PX', ARGV[3])
return 1
"""

# KEYS[1] record; ARGV[1] run_id.
DROP_KEY = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record.run_id ~= ARGV[1] or record.state ~= 'in_flight' then return 0 end
return redis.call('DEL', KEYS[1])
"""

# The slot set lives as long as its longest lease, so an idle account leaves nothing behind.
_EXPIRE_SLOTS = """
local function expire_slots(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"""

# KEYS[1] the account's slot set (run_id scored by lease expiry, ms);
# ARGV[1] run_id, ARGV[2] limit (0 = none), ARGV[3] lease ms. {taken 0/1, held}.
ACQUIRE_SLOT = _NOW + _EXPIRE_SLOTS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
if limit > 0 and held >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
expire_slots(KEYS[1])
return {1, redis.call('ZCARD', KEYS[1])}
"""

# KEYS: ARGV[2] slot sets, then records; ARGV[1] lease ms, ARGV[3…] one run_id per key.
# Only live leases are extended: an expired one is gone, as if already swept.
RENEW = _NOW + _EXPIRE_SLOTS + """
local lease = tonumber(ARGV[1])
local slots = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local run_id = ARGV[i + 2]
  if i <= slots then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZADD', key, 'XX', 'CH', now + lease, run_id) == 1 then
      expire_slots(key)
    end
  else
    local current = redis.call('GET', key)
    if current then
      local record = cjson.decode(current)
      if record.run_id == run_id and record.state == 'in_flight' then
        redis.call('PEXPIRE', key, lease)
      end
    end
  end
end
return 0
"""


# The usage outbox: a hash of records by event_id, and a sorted set of the same
# event_ids scored by lease expiry (ms); a record is takeable once its score passes.
# KEYS[1] hash, KEYS[2] leases; ARGV[1] event_id, ARGV[2] record JSON, ARGV[3] lease ms.
OUTBOX_PUT = _NOW + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 0
"""

# KEYS[1] leases; ARGV[1] lease ms, ARGV[2…] event_ids. XX: a record already done stays done.
OUTBOX_HOLD = _NOW + """
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
return 0
"""

# KEYS[1] hash, KEYS[2] leases; ARGV[1] limit, ARGV[2] lease ms. The records taken, as JSON.
OUTBOX_TAKE = _NOW + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local taken = {}
for _, event_id in ipairs(due) do
  local record = redis.call('HGET', KEYS[1], event_id)
  if record then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), event_id)
    table.insert(taken, record)
  else
    redis.call('ZREM', KEYS[2], event_id)
  end
end
return taken
"""

# KEYS[1] hash, KEYS[2] leases; ARGV[1] event_id.
OUTBOX_DONE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""
OUTBOX = [f"{PREFIX}outbox:records", f"{PREFIX}outbox:leases"]


def _ms(seconds: float) -> int:
    # PX 0 is an error, and a lease never rounds down to nothing.
    return max(1, int(seconds * 1000))


def _key(scope: str) -> str:
    return f"{PREFIX}key:{scope}"


def _slots(account: str) -> str:
    return f"{PREFIX}slots:{account}"


def _record(value: str) -> Claim:
    data = json.loads(value)
    return Claim(data["state"], data["fingerprint"], data["run_id"], data.get("answer"))


@contextlib.contextmanager
def _reachable():
    """Every failure to get an answer from the store becomes StateUnavailable; redis-py's errors stay here."""
    try:
        yield
    except redis.RedisError as exc:
        log.warning("state store: %s: %s", type(exc).__name__, exc)  # pragma: no mutate
        raise StateUnavailable() from exc
    except (ValueError, KeyError, TypeError) as exc:
        # A record this code did not write (or a newer format): no run without readable controls.
        log.warning("state store: unreadable record: %s", exc)  # pragma: no mutate
        raise StateUnavailable() from exc


class RedisStore:
    """Run controls in Redis; one pool of connections shared by the request threads of a process."""

    def __init__(self, url: str):
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            health_check_interval=HEALTH_CHECK_SECONDS,
            # One immediate retry on a broken connection (the server restarted since it was pooled);
            # none on a timeout, which would only double the wait of a run that gets a 503 anyway.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            decode_responses=True,
        )
        self._claim = self._client.register_script(CLAIM_KEY)
        self._finish = self._client.register_script(FINISH_KEY)
        self._drop = self._client.register_script(DROP_KEY)
        self._acquire = self._client.register_script(ACQUIRE_SLOT)
        self._renew = self._client.register_script(RENEW)
        self._outbox_put = self._client.register_script(OUTBOX_PUT)
        self._outbox_hold = self._client.register_script(OUTBOX_HOLD)
        self._outbox_take = self._client.register_script(OUTBOX_TAKE)
        self._outbox_done = self._client.register_script(OUTBOX_DONE)

    def claim_key(self, scope, fingerprint, run_id, lease):
        record = json.dumps({"state": IN_FLIGHT, "fingerprint": fingerprint, "run_id": run_id},
                            separators=(",", ":"))
        with _reachable():
            existing = self._claim(keys=[_key(scope)], args=[record, _ms(lease)])
            if existing is None:
                return Claim(IN_FLIGHT, fingerprint, run_id, new=True)
            claim = _record(existing)
        if claim.state == IN_FLIGHT and claim.run_id == run_id:
            # This run's own record: the call was retried after the reply to the first was lost.
            return claim._replace(new=True)
        return claim

    def read_key(self, scope):
        with _reachable():
            value = self._client.get(_key(scope))
            return None if value is None else _record(value)

    def finish_key(self, scope, run_id, answer, ttl):
        with _reachable():
            self._finish(keys=[_key(scope)], args=[run_id, json.dumps(answer, separators=(",", ":")), _ms(ttl)])

    def drop_key(self, scope, run_id):
        with _reachable():
            self._drop(keys=[_key(scope)], args=[run_id])

    def acquire_slot(self, account, run_id, limit, lease):
        with _reachable():
            taken, held = self._acquire(keys=[_slots(account)], args=[run_id, int(limit or 0), _ms(lease)])
        return bool(taken), int(held)

    def release_slot(self, account, run_id):
        with _reachable():
            self._client.zrem(_slots(account), run_id)

    def renew(self, slots, keys, lease):
        slots, keys = list(slots), list(keys)
        if not slots and not keys:
            return
        names = [_slots(account) for account, _ in slots] + [_key(scope) for scope, _ in keys]
        run_ids = [run_id for _, run_id in slots] + [run_id for _, run_id in keys]
        with _reachable():
            self._renew(keys=names, args=[_ms(lease), len(slots), *run_ids])

    def outbox_put(self, event_id, record, lease):
        with _reachable():
            self._outbox_put(keys=OUTBOX, args=[event_id, json.dumps(record, separators=(",", ":")), _ms(lease)])

    def outbox_hold(self, event_ids, lease):
        event_ids = list(event_ids)
        if event_ids:
            with _reachable():
                self._outbox_hold(keys=OUTBOX[1:], args=[_ms(lease), *event_ids])

    def outbox_take(self, limit, lease):
        with _reachable():
            return [json.loads(record) for record in self._outbox_take(keys=OUTBOX, args=[int(limit), _ms(lease)])]

    def outbox_done(self, event_id):
        with _reachable():
            self._outbox_done(keys=OUTBOX, args=[event_id])

    def ping(self):
        with _reachable():
            self._client.ping()

    def close(self):
        self._client.connection_pool.disconnect()
