-- One account's pool (prepended to every pool script). KEYS, in order:
-- holders (ZSET ticket -> lease deadline ms), hsub (HASH holder -> sub),
-- subn (HASH sub -> holders), queue (ZSET ticket -> join sequence),
-- qlive (ZSET ticket -> liveness deadline ms), qsub / qcap (HASH queued
-- ticket -> sub, cap), owner (HASH queued ticket -> instance), seq, limit,
-- ver (a counter every script bumps, so replies can be ordered), ewma
-- (task duration in ms, for Retry-After), limsrc ('set': the limit was
-- set for this account, its packages counted; 'default': it is the
-- cluster's default concurrency, which any replica may bring up to date).
local K_HOLDERS, K_HSUB, K_SUBN, K_QUEUE, K_QLIVE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_QSUB, K_QCAP, K_OWNER, K_SEQ, K_LIMIT = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_VER, K_EWMA, K_LIMSRC = KEYS[11], KEYS[12], KEYS[13]

-- Idle pools fade away; any live ticket keeps touching them.
local IDLE_MS = 86400000

-- The server's clock, never a replica's: leases compare across replicas.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function free_holder(t)
  if redis.call('ZREM', K_HOLDERS, t) == 0 then
    return false
  end
  local sub = redis.call('HGET', K_HSUB, t)
  if sub then
    redis.call('HDEL', K_HSUB, t)
    if redis.call('HINCRBY', K_SUBN, sub, -1) <= 0 then
      redis.call('HDEL', K_SUBN, sub)
    end
  end
  return true
end

local function drop_waiter(t)
  redis.call('ZREM', K_QLIVE, t)
  if redis.call('ZREM', K_QUEUE, t) == 0 then
    return false
  end
  redis.call('HDEL', K_QSUB, t)
  redis.call('HDEL', K_QCAP, t)
  redis.call('HDEL', K_OWNER, t)
  return true
end

-- Leases of dead replicas and waiters nobody renews any more go first, so
-- every decision below sees only the living.
local function purge(now)
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', K_HOLDERS, '-inf', now)) do
    free_holder(t)
  end
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', K_QLIVE, '-inf', now)) do
    drop_waiter(t)
  end
end

local function limit()
  return tonumber(redis.call('GET', K_LIMIT) or '1')
end

local function sub_room(sub, cap)
  return tonumber(redis.call('HGET', K_SUBN, sub) or '0') < cap
end

local function take(t, now, lease, sub)
  redis.call('ZADD', K_HOLDERS, now + lease, t)
  if sub then
    redis.call('HSET', K_HSUB, t, sub)
    redis.call('HINCRBY', K_SUBN, sub, 1)
  end
end

-- Grants and refusals to tell their owners once the script's counts are
-- known: {channel, kind, ticket}.
local HINTS = {}

-- Hands free slots to waiters in join order, skipping those whose
-- sub-account is at its cap (they do not block the tasks behind them).
-- Each grant is published to its owner as a hint; the owner's heartbeat
-- finds it anyway if the message is lost.
local function grant(now, lease, chan)
  local lim = limit()
  local n = redis.call('ZCARD', K_HOLDERS)
  local full = {}
  local after = '-inf'
  while n < lim do
    local batch = redis.call('ZRANGEBYSCORE', K_QUEUE, after, '+inf', 'WITHSCORES', 'LIMIT', 0, 64)
    if #batch == 0 then
      break
    end
    for i = 1, #batch, 2 do
      local t = batch[i]
      after = '(' .. batch[i + 1]
      local sub = redis.call('HGET', K_QSUB, t)
      local ok = true
      if sub then
        if full[sub] then
          ok = false
        elseif not sub_room(sub, tonumber(redis.call('HGET', K_QCAP, t) or '0')) then
          full[sub] = true
          ok = false
        end
      end
      if ok then
        local owner = redis.call('HGET', K_OWNER, t)
        drop_waiter(t)
        take(t, now, lease, sub)
        if owner then
          HINTS[#HINTS + 1] = {chan .. owner, 'G', t}
        end
        n = n + 1
        if n >= lim then
          break
        end
      end
    end
  end
end

-- The pool's counts after this script, stamped with a fresh version; the
-- hints carry them too ('G <ver> <limit> <holders> <queued> <ewma>
-- <ticket>'), so an owner that learns of its grant first also sees counts
-- at least as new.
local function stats()
  local ver = redis.call('INCR', K_VER)
  for _, k in ipairs({K_VER, K_SEQ, K_LIMIT, K_EWMA, K_LIMSRC}) do
    redis.call('PEXPIRE', k, IDLE_MS)
  end
  local s = {ver, limit(), redis.call('ZCARD', K_HOLDERS), redis.call('ZCARD', K_QUEUE),
    tonumber(redis.call('GET', K_EWMA) or '0')}
  local counts = table.concat(s, ' ')
  for _, h in ipairs(HINTS) do
    redis.call('PUBLISH', h[1], h[2] .. ' ' .. counts .. ' ' .. h[3])
  end
  return s
end
