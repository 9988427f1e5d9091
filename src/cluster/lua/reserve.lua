-- ARGV: reservation id, lease ms, then (package, size, durable used) per
-- payer in deduction order. Returns the 1-based payer taken, 0 if none.
local now = server_now()
purge(now)
local r, lease = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local pkg, size, used = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local taken = tonumber(redis.call('HGET', K_TAKEN, pkg) or '-1')
  -- The store is the truth for used units: never count fewer.
  if taken < used then
    redis.call('HSET', K_TAKEN, pkg, used)
    taken = used
  end
  if taken < size then
    redis.call('HINCRBY', K_TAKEN, pkg, 1)
    redis.call('ZADD', K_RESV, now + lease, r)
    redis.call('HSET', K_RESVPKG, r, pkg)
    for _, k in ipairs({K_TAKEN, K_RESV, K_RESVPKG}) do
      redis.call('PEXPIRE', k, IDLE_MS)
    end
    return (i - 3) / 3 + 1
  end
end
return 0
