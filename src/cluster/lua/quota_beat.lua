-- One replica's reservations in one account, once per heartbeat. ARGV:
-- lease ms, then reservation ids; an id prefixed with '+' was committed
-- (its success is durable): its record is dropped and its unit stays
-- taken, so a commit costs no round trip of its own. Others are renewed.
-- Returns 1 (renewed, or settled) / 0 (lost: it had expired) per id.
local now = server_now()
purge(now)
local lease = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if string.sub(id, 1, 1) == '+' then
    id = string.sub(id, 2)
    if redis.call('ZREM', K_RESV, id) == 1 then
      redis.call('HDEL', K_RESVPKG, id)
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  elseif redis.call('ZSCORE', K_RESV, id) then
    redis.call('ZADD', K_RESV, 'XX', now + lease, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
