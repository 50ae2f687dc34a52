"""The Lua scripts of the Redis store: each runs atomically on the Redis server, and touches
only keys of one hash slot (every key of a call shares one hash tag)."""

# Compare-and-set of a token record, its expiry and the change notice in one atomic step, so
# no replica can overwrite a newer record or miss publishing what it wrote (broker.md rule 3).
# KEYS: record, spent refresh tokens, lock. ARGV: version, envelope, TTL ms, channel, notice,
# lock token ('' = not fenced), fingerprint of a refresh token spent by this write ('' = none),
# until when to remember it (epoch ms; 0 = forget it: it was put back unsent), now (epoch ms).
# Returns 1 when written, 0 when a record of equal or higher version is stored, -1 when the
# write is fenced and the lock is no longer the writer's.
SAVE_RECORD = """
if ARGV[6] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[6] then
    return -1
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if stored >= tonumber(ARGV[1]) then
    return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[7] ~= '' and ARGV[8] == '0' then
    redis.call('ZREM', KEYS[2], ARGV[7])
elseif ARGV[7] ~= '' then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[9])
    redis.call('ZADD', KEYS[2], 'GT', ARGV[8], ARGV[7])
    local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', KEYS[2], last[2])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# Remember refresh tokens as spent (a replica re-seeding a store that lost them).
# KEYS: spent refresh tokens. ARGV: now (epoch ms), then pairs of until (epoch ms), fingerprint.
REMEMBER_SPENT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
for index = 2, #ARGV, 2 do
    redis.call('ZADD', KEYS[1], 'GT', ARGV[index], ARGV[index + 1])
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
    redis.call('PEXPIREAT', KEYS[1], last[2])
end
return 0
"""

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# The holder's watchdog: lengthen the lease only while the lock is still its own.
EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# The epoch check shared by the budget scripts. The store's epoch is the Redis server's run
# id, which changes whenever the data may have gone back in time: a restart (empty, or from an
# older snapshot or backup) or a failover to another node. The budget log and cool-down of a
# new epoch cannot be trusted, so the first caller to see one holds every grant back for
# ARGV[hold] ms, after which every grant of the old epoch is older than a window.
# A caller that never saw an epoch (a replica just started, against a store that has none
# recorded) cannot tell a first start from a store restarted empty, and holds nothing back;
# but the epoch key records when the epoch was first seen (Redis time), so a replica that
# knew the old epoch and comes later still holds back what is left of that window.
# KEYS[2] is the cool-down, KEYS[3] the epoch key ("<run id> <ms first seen>"); sets `epoch`
# (the run id) for the caller.
_EPOCH_CHECK = """
local info = redis.call('INFO', 'server')
local epoch = string.match(info, 'run_id:(%x+)') or ''
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local recorded = redis.call('GET', KEYS[3])
local recorded_epoch, since = nil, now
if recorded then
    local first_seen
    recorded_epoch, first_seen = string.match(recorded, '^(%x*) (%d+)$')
    since = tonumber(first_seen or '') or now
end
local known = ARGV[EPOCH_ARG]
local hold = tonumber(ARGV[EPOCH_ARG + 1])
local held = 0
if recorded_epoch ~= epoch then
    redis.call('SET', KEYS[3], epoch .. ' ' .. now)
    if recorded or (known ~= '' and known ~= epoch) then
        held = hold
    end
elseif known ~= '' and known ~= epoch then
    held = since + hold - now
end
if held > 0 and redis.call('PTTL', KEYS[2]) < held then
    redis.call('SET', KEYS[2], 'epoch', 'PX', held)
end
"""

# A strict sliding log on Redis's own clock, so replicas with skewed clocks share one window
# (broker.md rule 4), and the renewal queue that orders the units under contention.
# KEYS: log, cool-down, epoch, queue (account -> priority, lower first), seen (account -> when
# its claim was last registered). ARGV: limit, period ms, unique suffix, units held in reserve
# (a grant needs more than this many free), the caller's last known epoch, the hold-back in ms
# for a new epoch, the longest cool-down in ms (a longer one, left by an older broker that took
# Retry-After: 1e9 at its word, is cut to it), the account ('' for none: no queue, as an older
# broker), its priority, the ms after which an entry not registered again is dropped (its
# replica is gone), 1 to register the claim (a caller that will wait) or 0 to only ask, the
# shortest wait in ms returned to a queued caller, the pace in ms (a grant then needs the last
# grant to be at least this old; 0 for none, and none once another replica's more urgent claim
# for the account lowered its entry).
# A unit goes to the account only while its rank in the queue (or, unregistered, the number of
# more urgent claims) is below the free units; a grant removes its entry. Any replica's most
# urgent claim for an account wins (ZADD LT).
# Returns {wait ms (0 when granted), epoch}.
TAKE_BUDGET = (
    _EPOCH_CHECK.replace("EPOCH_ARG", "5")
    + """
local account = ARGV[8]
local priority = ARGV[9]
local stale = tonumber(ARGV[10])
local register = account ~= '' and ARGV[11] == '1'
if register then
    redis.call('ZADD', KEYS[4], 'LT', priority, account)
    redis.call('ZADD', KEYS[5], now, account)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', string.format('(%d', now - stale))
for _, member in ipairs(gone) do
    redis.call('ZREM', KEYS[4], member)
    redis.call('ZREM', KEYS[5], member)
end
if register then
    redis.call('PEXPIRE', KEYS[4], stale * 2)
    redis.call('PEXPIRE', KEYS[5], stale * 2)
end
local cooling = redis.call('PTTL', KEYS[2])
local longest = tonumber(ARGV[7])
if cooling > longest then
    redis.call('PEXPIRE', KEYS[2], longest)
    cooling = longest
end
if cooling > 0 then
    return {cooling, epoch}
end
local limit = tonumber(ARGV[1]) - tonumber(ARGV[4])
local period = tonumber(ARGV[2])
-- A grant exactly one period old still counts: the window is closed at both ends.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('(%d', now - period))
local count = redis.call('ZCARD', KEYS[1])
local rank = 0
if register then
    rank = redis.call('ZRANK', KEYS[4], account)
elseif account ~= '' then
    rank = redis.call('ZCOUNT', KEYS[4], '-inf', '(' .. priority)
end
-- A paced claim waits until the last grant is `pace` ms old: spread over the window. Not one
-- that a more urgent claim of another replica lowered (hasten: a caller waits for the account),
-- as a caller's claim is never paced.
local paced_until = now
local pace = tonumber(ARGV[13])
if register and pace > 0 then
    local queued = redis.call('ZSCORE', KEYS[4], account)
    if queued and tonumber(queued) < tonumber(priority) then
        pace = 0
    end
end
if pace > 0 and count > 0 then
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    paced_until = tonumber(last[2]) + pace
end
if rank < limit - count and paced_until <= now then
    redis.call('ZADD', KEYS[1], now, string.format('%d-%s', now, ARGV[3]))
    redis.call('PEXPIRE', KEYS[1], period)
    if register then
        redis.call('ZREM', KEYS[4], account)
        redis.call('ZREM', KEYS[5], account)
    end
    return {0, epoch}
end
local shortest = 1
if account ~= '' then
    shortest = tonumber(ARGV[12])
end
if count == 0 then
    return {math.max(shortest, period), epoch}
end
if rank < limit - count then
    return {math.max(shortest, paced_until - now), epoch}
end
-- rank + 1 units must be free: the (rank - free)-th oldest grant must leave (the limit may
-- also have been lowered below the log's length); past the log's end, its last grant.
local index = math.min(count - 1, count - limit + rank)
local frees = redis.call('ZRANGE', KEYS[1], index, index, 'WITHSCORES')
return {math.max(shortest, tonumber(frees[2]) + period - now, paced_until - now), epoch}
"""
)

# KEYS: log (unused), cool-down, epoch. ARGV: cool-down ms (0: only check the epoch), the
# caller's last known epoch, the hold-back in ms for a new epoch. Returns the epoch.
COOL_DOWN = (
    _EPOCH_CHECK.replace("EPOCH_ARG", "2")
    + """
local cool = tonumber(ARGV[1])
if cool > 0 and redis.call('PTTL', KEYS[2]) < cool then
    redis.call('SET', KEYS[2], '1', 'PX', cool)
end
return epoch
"""
)

# A caller may force one renewal of an account per interval. KEYS: the caller's marker for the
# account. ARGV: interval ms, the fingerprint of a reported token ('' for none): reports of the
# token already charged for count once. Returns 0 when allowed, else the ms until it is.
TAKE_FORCED = """
local value = ARGV[2]
if value == '' then
    value = '1'
end
if redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[1]) then
    return 0
end
if ARGV[2] ~= '' and redis.call('GET', KEYS[1]) == ARGV[2] then
    return 0
end
return math.max(1, redis.call('PTTL', KEYS[1]))
"""
