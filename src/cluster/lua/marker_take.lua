-- An idempotency key's in-progress marker. KEYS[1]: the marker; ARGV:
-- owner (this replica's lease id), lease ms. Returns 1 if taken, 0 if
-- another live task holds it. An unrenewed marker expires on Redis's
-- clock, so a dead replica's marker lapses with its other leases.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then
  return 1
end
return 0
