"""The Redis store (--state-url): run controls shared by every provider process that points at it.

Same semantics as memory.py, made atomic by small registered Lua scripts, in
the shape of redis-py's Lock: a lease is a key or a sorted-set member with an
expiry, and nobody renews, finishes or drops what another run holds. Lease
expiry is reckoned on the server's clock (TIME, PX), so the clocks of the
provider hosts never matter.
"""
import contextlib
import hashlib
import json
import logging

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import StateUnavailable
from .base import IN_FLIGHT, RUNNING, Claim

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

# KEYS[1] record; ARGV[1] run_id, ARGV[2] ttl ms. The key now points at its run record.
BIND_KEY = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record.run_id ~= ARGV[1] then return 0 end
record.state = 'bound'
redis.call('SET', KEYS[1], cjson.encode(record), 'PX', ARGV[2])
return 1
"""

# KEYS[1] record; ARGV[1] run_id.
DROP_KEY = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local record = cjson.decode(current)
if record.run_id ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# The one lease: an id in a sorted set scored by its expiry (ms, server clock). A live holder
# extends it (XX: what is gone stays gone); once the score passes, whoever asks next takes it.
_LEASES = _NOW + """
local function lease(set, id, ms) redis.call('ZADD', set, now + ms, id) end
local function hold(set, id, ms) return redis.call('ZADD', set, 'XX', 'CH', now + ms, id) end
local function due(set, limit) return redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, limit) end
local function sweep(set) redis.call('ZREMRANGEBYSCORE', set, '-inf', now) end
-- Take `ids` (their leases passed) for `ms`: what `fetch` finds is leased anew and returned, the rest let go.
local function take(set, ids, ms, fetch)
  local taken = {}
  for _, id in ipairs(ids) do
    local record = fetch(id)
    if record then
      lease(set, id, ms)
      table.insert(taken, record)
    else
      redis.call('ZREM', set, id)
    end
  end
  return taken
end
"""

# The slot set lives as long as its longest lease, so an idle account leaves nothing behind.
_EXPIRE_SLOTS = """
local function expire_slots(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"""

# KEYS[1] the account's slot set (a lease per run_id);
# ARGV[1] run_id, ARGV[2] limit (0 = none), ARGV[3] lease ms. {taken 0/1, held}.
ACQUIRE_SLOT = _LEASES + _EXPIRE_SLOTS + """
sweep(KEYS[1])
local held = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
if limit > 0 and held >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, held}
end
lease(KEYS[1], ARGV[1], tonumber(ARGV[3]))
expire_slots(KEYS[1])
return {1, redis.call('ZCARD', KEYS[1])}
"""

# KEYS: ARGV[2] slot sets, then records; ARGV[1] lease ms, ARGV[3…] one run_id per key.
# Only live leases are extended: an expired one is gone, as if already swept.
RENEW = _LEASES + _EXPIRE_SLOTS + """
local ms = tonumber(ARGV[1])
local slots = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local run_id = ARGV[i + 2]
  if i <= slots then
    sweep(key)
    if hold(key, run_id, ms) == 1 then
      expire_slots(key)
    end
  else
    local current = redis.call('GET', key)
    if current then
      local record = cjson.decode(current)
      if record.run_id == run_id and record.state == 'in_flight' then
        redis.call('PEXPIRE', key, ms)
      end
    end
  end
end
return 0
"""

# KEYS[1] leases; ARGV[1] lease ms, ARGV[2…] ids. Outbox records and run records alike.
HOLD = _LEASES + """
local missing = {}
for i = 2, #ARGV do
  if hold(KEYS[1], ARGV[i], tonumber(ARGV[1])) == 0 then table.insert(missing, ARGV[i]) end
end
return missing
"""

# The usage outbox: a hash of records by event_id, and their leases.
# KEYS[1] hash, KEYS[2] leases; ARGV[1] event_id, ARGV[2] record JSON, ARGV[3] lease ms.
OUTBOX_PUT = _LEASES + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
lease(KEYS[2], ARGV[1], tonumber(ARGV[3]))
return 0
"""

# KEYS[1] hash, KEYS[2] leases; ARGV[1] limit, ARGV[2] lease ms. The records taken, as JSON.
OUTBOX_TAKE = _LEASES + """
return take(KEYS[2], due(KEYS[2], tonumber(ARGV[1])), tonumber(ARGV[2]),
            function(event_id) return redis.call('HGET', KEYS[1], event_id) end)
"""

# KEYS[1] hash, KEYS[2] leases; ARGV[1] event_id.
OUTBOX_DONE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""
OUTBOX = [f"{PREFIX}outbox:records", f"{PREFIX}outbox:leases"]

# Run records: a string key per run (JSON that starts with its state, so a script can read
# and change the state without decoding: cjson would turn an empty list into an object),
# their leases, and a sorted set per account of its run ids by creation time.
RUNNING_HEAD = '{"state":"running"'
FINISHED_HEAD = '{"state":"finished"'
RUN_LEASES = f"{PREFIX}runs:leases"
# The newest run ids listed per account (the list shows the 100 newest).
INDEX_CAP = 1000

# KEYS[1] record, KEYS[2] leases, KEYS[3] account index;
# ARGV[1] run_id, ARGV[2] record JSON, ARGV[3] lease ms, ARGV[4] ttl ms, ARGV[5] created ms.
PUT_RUN = _LEASES + f"""
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
lease(KEYS[2], ARGV[1], tonumber(ARGV[3]))
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -{INDEX_CAP + 1})
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[3], ARGV[4]) end
return 0
"""

# KEYS[1] record, KEYS[2] leases, KEYS[3] account index;
# ARGV[1] run_id, ARGV[2] answer JSON, ARGV[3] keep ms (0: not kept), ARGV[4] "1" to forget.
# 1 when this call finished it, else 0: one completion per run.
FINISH_RUN = f"""
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, 1, {len(RUNNING_HEAD)}) ~= '{RUNNING_HEAD}' then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
local forget = ''
if ARGV[4] == '1' then forget = ',"forgotten":true' end
local finished = '{FINISHED_HEAD}' .. string.sub(current, {len(RUNNING_HEAD) + 1}, -2) ..
  ',"answer":' .. ARGV[2] .. forget .. '}}'
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], finished, 'PX', ARGV[3])
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS[1] leases; ARGV[1] limit, ARGV[2] lease ms, ARGV[3] record key prefix, ARGV[4] one run_id or "".
TAKE_RUNS = _LEASES + f"""
local ids = {{}}
if ARGV[4] ~= '' then
  local score = redis.call('ZSCORE', KEYS[1], ARGV[4])
  if score and tonumber(score) <= now then ids = {{ARGV[4]}} end
else
  ids = due(KEYS[1], tonumber(ARGV[1]))
end
return take(KEYS[1], ids, tonumber(ARGV[2]), function(id)
  local record = redis.call('GET', ARGV[3] .. id)
  if record and string.sub(record, 1, {len(RUNNING_HEAD)}) == '{RUNNING_HEAD}' then return record end
  return false
end)
"""


def _ms(seconds: float) -> int:
    # PX 0 is an error, and a lease never rounds down to nothing.
    return max(1, int(seconds * 1000))


def _key(scope: str) -> str:
    return f"{PREFIX}key:{scope}"


def _slots(account: str) -> str:
    return f"{PREFIX}slots:{account}"


def _run(run_id: str) -> str:
    return f"{PREFIX}run:{run_id}"


def _index(account: str) -> str:
    return f"{PREFIX}runs:account:{hashlib.sha256(account.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _record(value: str) -> Claim:
    data = json.loads(value)
    return Claim(data["state"], data["fingerprint"], data["run_id"])


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


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
        self._bind = self._client.register_script(BIND_KEY)
        self._drop = self._client.register_script(DROP_KEY)
        self._acquire = self._client.register_script(ACQUIRE_SLOT)
        self._renew = self._client.register_script(RENEW)
        self._outbox_put = self._client.register_script(OUTBOX_PUT)
        self._hold = self._client.register_script(HOLD)
        self._put_run = self._client.register_script(PUT_RUN)
        self._finish_run = self._client.register_script(FINISH_RUN)
        self._take_runs = self._client.register_script(TAKE_RUNS)
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

    def bind_key(self, scope, run_id, ttl):
        with _reachable():
            self._bind(keys=[_key(scope)], args=[run_id, _ms(ttl)])

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
                self._hold(keys=OUTBOX[1:], args=[_ms(lease), *event_ids])

    def outbox_take(self, limit, lease):
        with _reachable():
            return [json.loads(record) for record in self._outbox_take(keys=OUTBOX, args=[int(limit), _ms(lease)])]

    def outbox_done(self, event_id):
        with _reachable():
            self._outbox_done(keys=OUTBOX, args=[event_id])

    def put_run(self, record, lease, ttl):
        # The state first: the scripts read it from the head of the JSON.
        value = _json({"state": RUNNING, **{k: v for k, v in record.items() if k != "state"}})
        with _reachable():
            self._put_run(keys=[_run(record["run_id"]), RUN_LEASES, _index(record["owner_account_id"])],
                          args=[record["run_id"], value, _ms(lease), _ms(ttl), int(record["created"] * 1000)])

    def read_run(self, run_id):
        with _reachable():
            value = self._client.get(_run(run_id))
            return None if value is None else json.loads(value)

    def list_runs(self, account, limit):
        index = _index(account)
        with _reachable():
            # A few more than asked: some may have expired or been deleted since they were indexed.
            run_ids = self._client.zrevrange(index, 0, limit + 50)
            values = self._client.mget([_run(run_id) for run_id in run_ids]) if run_ids else []
            gone = [run_id for run_id, value in zip(run_ids, values) if value is None]
            if gone:
                self._client.zrem(index, *gone)
            records = [json.loads(value) for value in values if value is not None]
        return [record for record in records if not record.get("forgotten")][:limit]

    def finish_run(self, run_id, account, answer, keep, forget=False):
        with _reachable():
            return self._finish_run(keys=[_run(run_id), RUN_LEASES, _index(account)],
                                    args=[run_id, _json(answer), int(keep * 1000), "1" if forget else "0"]) == 1

    def drop_run(self, run_id):
        with _reachable():
            self._client.delete(_run(run_id))
            self._client.zrem(RUN_LEASES, run_id)

    def hold_runs(self, run_ids, lease):
        run_ids = list(run_ids)
        if not run_ids:
            return []
        with _reachable():
            # A lease of 0 gives the records up: takeable at once.
            return self._hold(keys=[RUN_LEASES], args=[max(0, int(lease * 1000)), *run_ids])

    def take_runs(self, limit, lease, run_id=None):
        with _reachable():
            taken = self._take_runs(keys=[RUN_LEASES], args=[int(limit), _ms(lease), _run(""), run_id or ""])
            return [json.loads(record) for record in taken]

    def ping(self):
        with _reachable():
            self._client.ping()

    def close(self):
        self._client.connection_pool.disconnect()
