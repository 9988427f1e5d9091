-- One replica's heartbeat in one pool. ARGV: lease ms, grant channel
-- prefix, number of held tickets, the held tickets, then the queued ones.
-- Returns {stats, held: 1 renewed / 0 lost, queued: 0 waiting /
-- 1 granted / 2 gone}.
local now = server_now()
local lease, chan, nheld = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
-- Purge first: a lease that already expired is lost, never revived, so
-- every replica sees the same history.
purge(now)
local held = {}
for i = 4, 3 + nheld do
  if redis.call('ZSCORE', K_HOLDERS, ARGV[i]) then
    redis.call('ZADD', K_HOLDERS, 'XX', now + lease, ARGV[i])
    held[#held + 1] = 1
  else
    held[#held + 1] = 0
  end
end
grant(now, lease, chan)
local queued = {}
for i = 4 + nheld, #ARGV do
  local t = ARGV[i]
  if redis.call('ZSCORE', K_QUEUE, t) then
    redis.call('ZADD', K_QLIVE, 'XX', now + lease, t)
    queued[#queued + 1] = 0
  elseif redis.call('ZSCORE', K_HOLDERS, t) then
    queued[#queued + 1] = 1
  else
    queued[#queued + 1] = 2
  end
end
return {stats(), held, queued}
