-- The pool's counts now, for the admin's account view: holders of every
-- replica (expired leases left out) and the cluster-wide queue. Changes
-- nothing but the version counter.
local now = server_now()
purge(now)
return stats()
