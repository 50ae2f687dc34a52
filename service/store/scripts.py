"""The Lua scripts of the Redis store: each runs atomically on the Redis server."""

# Compare-and-set of a token record, its expiry and the change notice in one atomic step, so
# no replica can overwrite a newer record or miss publishing what it wrote (DESIGN rule 3).
SAVE_RECORD = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if stored >= tonumber(ARGV[1]) then
    return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# A strict sliding log on Redis's own clock, so replicas with skewed clocks share one window
# (DESIGN rule 4). Returns 0 when granted, else the milliseconds to wait.
TAKE_BUDGET = """
local cooling = redis.call('PTTL', KEYS[2])
if cooling > 0 then
    return cooling
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
-- A grant exactly one period old still counts: the window is closed at both ends.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now - period))
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
    redis.call('ZADD', KEYS[1], now, string.format('%d-%s', now, ARGV[3]))
    redis.call('PEXPIRE', KEYS[1], period)
    return 0
end
-- The limit may have been lowered below the log's length: wait until enough grants leave.
local frees = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return math.max(1, tonumber(frees[2]) + period - now)
"""

COOL_DOWN = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
"""
