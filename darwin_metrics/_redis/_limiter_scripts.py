"""The Lua scripts of :class:`~darwin_metrics.redis.SharedCapacityLimiter`: one atomic step each.

Every script works on the six keys of one limiter, which share the hash tag ``{name}`` (so they
live in one slot, as a script's keys must)::

    KEYS[1] holders  ZSET  member -> lease deadline (ms, the server's TIME)
    KEYS[2] queue    ZSET  member -> ticket (FIFO order)
    KEYS[3] waiters  ZSET  member -> liveness deadline of a queued member (ms)
    KEYS[4] fences   HASH  member -> fencing token of a held member
    KEYS[5] state    HASH  ticket, fence (counters), total (the limit in force)
    KEYS[6] gone     ZSET  member -> expiry (ms): members given back before they arrived

The fencing token of a grant is the ``fence`` counter plus one, or the server's clock in
microseconds if that is larger (see ``next_fence``).

A *member* is ``<owner>:<n>``: the limiter instance that asked (its own random id) and a
number of its own, chosen by the client before the request is sent. Every script starts the
same way (:data:`_PRELUDE`): it reads the server's clock, removes the holders and waiters whose
deadline has passed (a process that died), and hands free permits to the head of the queue
(``serve``), publishing each grant to its owner's channel (``ARGV[1] .. owner``) as
``"<member> <fence> <total> <held>"``. Every reply ends with the same five integers
(:data:`TAIL`): the limit in force, the permits held and the members queued fleet-wide, the
milliseconds until the earliest holder's deadline (-1: none) and how many expired holders
this call reaped.

Common arguments: ``ARGV[1]`` the channel prefix, ``ARGV[2]`` the caller's ``total_tokens``,
used only if the server has no limit recorded (a fresh or flushed server).
"""

from __future__ import annotations

from ._scripts import Script

__all__ = ["ACQUIRE", "KEY_NAMES", "RELEASE", "RENEW", "SET_TOTAL", "TAIL"]

#: The suffixes of the six keys, in ``KEYS`` order.
KEY_NAMES = (b"holders", b"queue", b"waiters", b"fences", b"state", b"gone")
#: How many integers every reply ends with.
TAIL = 5

_PRELUDE = """
local H, Q, W, F, S, G = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local chan = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('HGET', S, 'total'))
if not total then
  total = tonumber(ARGV[2])
  redis.call('HSET', S, 'total', total)
end
local reaped = 0
-- Fencing tokens: strictly increasing, and never below the server's clock in microseconds,
-- so that a server that forgot the counter (restarted without persistence, a promoted
-- replica that missed the latest grants) still gives larger ones than before. Written and
-- published as decimal strings: Lua would print such numbers in exponent notation.
local function next_fence()
  local fence = redis.call('HINCRBY', S, 'fence', 1)
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if fence < floor then
    fence = floor
    redis.call('HSET', S, 'fence', string.format('%.0f', fence))
  end
  return fence, string.format('%.0f', fence)
end
local function reap()
  local dead = redis.call('ZRANGEBYSCORE', H, '-inf', now, 'LIMIT', 0, 1000)
  if #dead > 0 then
    redis.call('ZREM', H, unpack(dead))
    redis.call('HDEL', F, unpack(dead))
    reaped = #dead
  end
  local late = redis.call('ZRANGEBYSCORE', W, '-inf', now, 'LIMIT', 0, 1000)
  if #late > 0 then
    redis.call('ZREM', W, unpack(late))
    redis.call('ZREM', Q, unpack(late))
  end
  redis.call('ZREMRANGEBYSCORE', G, '-inf', now)
end
local function serve()
  local held = redis.call('ZCARD', H)
  while held < total do
    local head = redis.call('ZRANGE', Q, 0, 0)
    if #head == 0 then break end
    local m = head[1]
    local deadline = redis.call('ZSCORE', W, m) or (now + 1000)
    redis.call('ZREM', Q, m)
    redis.call('ZREM', W, m)
    local _, fence = next_fence()
    redis.call('ZADD', H, deadline, m)
    redis.call('HSET', F, m, fence)
    held = held + 1
    redis.call('PUBLISH', chan .. string.match(m, '^[^:]*'),
      m .. ' ' .. fence .. ' ' .. total .. ' ' .. held)
  end
  return held
end
local function tail(reply, held)
  local first = redis.call('ZRANGE', H, 0, 0, 'WITHSCORES')
  local hint = -1
  if #first > 0 then hint = tonumber(first[2]) - now end
  reply[#reply + 1] = total
  reply[#reply + 1] = held
  reply[#reply + 1] = redis.call('ZCARD', Q)
  reply[#reply + 1] = hint
  reply[#reply + 1] = reaped
  return reply
end
"""

#: ``ACQUIRE(keys; chan, total, member, lease_ms, mode)``: ``mode`` is ``wait`` or ``try``.
#: Replies ``{1, ticket, fence, ...}`` (granted), ``{0, ticket, 0, ...}`` (queued, ``wait``
#: only), ``{-1, 0, 0, ...}`` (``try``: not free), ``{-2, 0, 0, ...}`` (the member was given
#: back before this request arrived: nothing done).
ACQUIRE = Script(
    "limiter-acquire",
    _PRELUDE
    + """
reap()
local held = serve()
local m = ARGV[3]
if redis.call('ZSCORE', G, m) then return tail({-2, 0, 0}, held) end
if held < total then
  local ticket = redis.call('HINCRBY', S, 'ticket', 1)
  local fence, text = next_fence()
  redis.call('ZADD', H, now + tonumber(ARGV[4]), m)
  redis.call('HSET', F, m, text)
  return tail({1, ticket, fence}, held + 1)
end
if ARGV[5] == 'try' then return tail({-1, 0, 0}, held) end
local ticket = redis.call('HINCRBY', S, 'ticket', 1)
redis.call('ZADD', Q, ticket, m)
redis.call('ZADD', W, now + tonumber(ARGV[4]), m)
return tail({0, ticket, 0}, held)
""",
)

#: ``RELEASE(keys; chan, total, gone_ms, member...)``: give back held members, take queued
#: ones out of the queue, and record the others as gone for ``gone_ms`` (an ``ACQUIRE`` of
#: theirs that is still on its way then does nothing). Idempotent. Replies
#: ``{released, ...}``.
RELEASE = Script(
    "limiter-release",
    _PRELUDE
    + """
reap()
local released = 0
local expiry = now + tonumber(ARGV[3])
for i = 4, #ARGV do
  local m = ARGV[i]
  if redis.call('ZREM', H, m) == 1 then
    redis.call('HDEL', F, m)
    released = released + 1
  elseif redis.call('ZREM', Q, m) == 1 then
    redis.call('ZREM', W, m)
  else
    redis.call('ZADD', G, expiry, m)
  end
end
return tail({released}, serve())
""",
)

#: ``RENEW(keys; chan, total, lease_ms, member...)``: extend every listed member that is
#: still there to ``now + lease_ms``. Replies one state per member, then the tail: the
#: member's fencing token if it is held (granted meanwhile, perhaps), 0 if it is queued,
#: -1 if it is gone (expired: its owner did not renew in time).
RENEW = Script(
    "limiter-renew",
    _PRELUDE
    + """
reap()
local held = serve()
local deadline = now + tonumber(ARGV[3])
local states = {}
for i = 4, #ARGV do
  local m = ARGV[i]
  local fence = redis.call('HGET', F, m)
  if fence and redis.call('ZSCORE', H, m) then
    redis.call('ZADD', H, 'XX', deadline, m)
    states[#states + 1] = tonumber(fence)
  elseif redis.call('ZSCORE', W, m) then
    redis.call('ZADD', W, 'XX', deadline, m)
    states[#states + 1] = 0
  else
    if fence then redis.call('HDEL', F, m) end
    states[#states + 1] = -1
  end
end
return tail(states, held)
""",
)

#: ``SET_TOTAL(keys; chan, total, new_total)``: record the fleet's limit and hand out what a
#: larger one frees. Replies the tail only.
SET_TOTAL = Script(
    "limiter-total",
    _PRELUDE
    + """
total = tonumber(ARGV[3])
redis.call('HSET', S, 'total', total)
reap()
return tail({}, serve())
""",
)
