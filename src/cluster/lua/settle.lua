-- A reservation ends. ARGV: reservation id, 1 if committed (the unit stays
-- taken) or 0 if released (the unit comes back). Returns 1 if it was
-- still held, 0 if it had expired already.
local now = server_now()
local r = ARGV[1]
local held = 0
if redis.call('ZREM', K_RESV, r) == 1 then
  held = 1
  local pkg = redis.call('HGET', K_RESVPKG, r)
  redis.call('HDEL', K_RESVPKG, r)
  if pkg and ARGV[2] == '0' then
    redis.call('HINCRBY', K_TAKEN, pkg, -1)
  end
end
purge(now)
return held
