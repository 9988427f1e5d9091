-- One replica's markers in one account, once per heartbeat. KEYS: the
-- markers; ARGV: lease ms, then each marker's owner. Returns 1 (renewed) /
-- 0 (lost: expired, or another task's since) per marker.
local lease = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], lease)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
