-- A ticket leaves the pool, queued or holding (a release, a cancel, or a
-- cancel that raced its grant). ARGV: ticket, lease ms, task duration ms
-- (0: none), grant channel prefix. Returns {was, stats}: 1 queued,
-- 2 holding, 0 unknown (expired already).
local now = server_now()
local t, lease, took, chan = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local was = 0
if drop_waiter(t) then
  was = 1
elseif free_holder(t) then
  was = 2
end
if took > 0 then
  local old = tonumber(redis.call('GET', K_EWMA) or '0')
  local new = took
  if old > 0 then
    new = math.floor((old * 7 + took) / 8)
  end
  redis.call('SET', K_EWMA, math.max(new, 1))
end
purge(now)
grant(now, lease, chan)
return {was, stats()}
