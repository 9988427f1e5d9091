-- The task with the key ended: its marker goes, unless it had lapsed and
-- another task holds the key now. KEYS[1]: the marker; ARGV[1]: owner.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
