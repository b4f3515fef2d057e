"""The Lua scripts the Redis-backed shared state runs: each is one atomic round trip."""

from __future__ import annotations

# A token bucket in one round trip: returns 0 when a token was taken, else the
# milliseconds until one is due.
TAKE_TOKEN = """
local now = tonumber(ARGV[1]); local rate = tonumber(ARGV[2]); local burst = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""

# Session slots are leases in a sorted set scored by expiry (Redis's own clock, so
# replicas' clocks do not matter): a replica that dies stops renewing its leases
# and its slots come back when they expire.
NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
TAKE_SLOTS = NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local n = math.min(math.max(room, 0), #ARGV - 2)
for i = 1, n do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i + 2]) end
if n > 0 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2) end
return n
"""
RENEW_SLOTS = NOW_MS + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return #ARGV - 1
"""
DROP_SLOTS = """
for i = 3, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
