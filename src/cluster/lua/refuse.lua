-- Every queued ticket of the account is refused, whichever replica holds
-- it. ARGV: grant channel prefix. Returns {stats, refused tickets}.
local now = server_now()
purge(now)
local refused = redis.call('ZRANGE', K_QUEUE, 0, -1)
for _, t in ipairs(refused) do
  local owner = redis.call('HGET', K_OWNER, t)
  drop_waiter(t)
  if owner then
    HINTS[#HINTS + 1] = {ARGV[1] .. owner, 'R', t}
  end
end
return {stats(), refused}
