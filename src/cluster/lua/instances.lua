-- The replica registry: KEYS[1] is a ZSET instance -> liveness deadline.
-- ARGV: instance, lease ms, mode: 'beat' renews and returns the number of
-- live replicas; 'claim' takes the name unless a live entry holds it
-- (then returns its deadline); 'take' takes it regardless; 'leave' drops it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k, name, lease, mode = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
if mode == 'claim' then
  local live = redis.call('ZSCORE', k, name)
  if live then
    return tonumber(live)
  end
elseif mode == 'leave' then
  redis.call('ZREM', k, name)
  return 0
end
redis.call('ZADD', k, now + lease, name)
if mode == 'beat' then
  return redis.call('ZCARD', k)
end
return 0
