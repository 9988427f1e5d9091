-- The cluster's `limits.default_concurrency`. KEYS[1]: its key; ARGV:
-- this replica's value, '1' to make it the cluster's (a reload changed
-- it) or '0' to keep the cluster's (set only if none is: the first
-- replica, or a Redis that lost its data). Returns the value in force.
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
return tonumber(redis.call('GET', KEYS[1]))
