-- One account's quota (prepended to every quota script). KEYS: taken
-- (HASH package -> units taken: durable used + held), resv (ZSET
-- reservation -> lease deadline ms), resvpkg (HASH reservation -> package).
local K_TAKEN, K_RESV, K_RESVPKG = KEYS[1], KEYS[2], KEYS[3]
local IDLE_MS = 86400000

local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A dead replica's reservations give their units back.
local function purge(now)
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', K_RESV, '-inf', now)) do
    local pkg = redis.call('HGET', K_RESVPKG, r)
    if pkg then
      redis.call('HINCRBY', K_TAKEN, pkg, -1)
      redis.call('HDEL', K_RESVPKG, r)
    end
    redis.call('ZREM', K_RESV, r)
  end
end
