-- Renews one replica's reservations in one account. ARGV: lease ms, then
-- reservation ids. Returns 1 renewed / 0 lost per id.
local now = server_now()
purge(now)
local lease = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', K_RESV, ARGV[i]) then
    redis.call('ZADD', K_RESV, 'XX', now + lease, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
