-- ARGV: limit, lease ms, grant channel prefix. Growing admits waiters at
-- once; shrinking takes nothing away.
local now = server_now()
redis.call('SET', K_LIMIT, ARGV[1])
purge(now)
grant(now, tonumber(ARGV[2]), ARGV[3])
return {0, stats()}
