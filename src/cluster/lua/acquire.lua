-- ARGV: ticket, owner instance, limit, 1 if the limit was set for this
-- account (0: it is the default concurrency: it replaces only another
-- default, never a limit set with the account's packages), max queue,
-- lease ms, sub-account ('' for none), its cap, grant channel prefix,
-- 1 to wait at the head of the queue (a job whose run died), else 0.
-- Returns {status, stats}: 1 granted, 0 queued, 2 full.
local now = server_now()
local t, owner = ARGV[1], ARGV[2]
local lease, chan = tonumber(ARGV[6]), ARGV[9]
if ARGV[4] == '1' then
  redis.call('SET', K_LIMIT, ARGV[3])
  redis.call('SET', K_LIMSRC, 'set')
elseif redis.call('GET', K_LIMSRC) ~= 'set' then
  redis.call('SET', K_LIMIT, ARGV[3])
  redis.call('SET', K_LIMSRC, 'default')
end
purge(now)
-- Waiters first: a newcomer never overtakes one that could run.
grant(now, lease, chan)
local sub = nil
if ARGV[7] ~= '' then
  sub = ARGV[7]
end
local cap = tonumber(ARGV[8])
local status
if redis.call('ZCARD', K_HOLDERS) < limit() and (not sub or sub_room(sub, cap)) then
  take(t, now, lease, sub)
  status = 1
elseif redis.call('ZCARD', K_QUEUE) >= tonumber(ARGV[5]) then
  status = 2
else
  local seq = redis.call('INCR', K_SEQ)
  if ARGV[10] == '1' then
    -- Ahead of the first waiter (scores only order the queue).
    local head = redis.call('ZRANGE', K_QUEUE, 0, 0, 'WITHSCORES')
    if head[2] then
      seq = tonumber(head[2]) - 1
    end
  end
  redis.call('ZADD', K_QUEUE, seq, t)
  redis.call('ZADD', K_QLIVE, now + lease, t)
  redis.call('HSET', K_OWNER, t, owner)
  if sub then
    redis.call('HSET', K_QSUB, t, sub)
    redis.call('HSET', K_QCAP, t, cap)
  end
  status = 0
end
return {status, stats()}
