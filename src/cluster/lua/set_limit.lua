-- ARGV: limit, lease ms, grant channel prefix, 'set' or 'default' (the
-- limit is the default concurrency: the account has no package now).
-- Growing admits waiters at once; shrinking takes nothing away.
local now = server_now()
redis.call('SET', K_LIMIT, ARGV[1])
redis.call('SET', K_LIMSRC, ARGV[4])
purge(now)
grant(now, tonumber(ARGV[2]), ARGV[3])
return {0, stats()}
