-- Append a history entry to a run that exists, and release a lease.
-- KEYS[1] record hash   KEYS[2] history head   KEYS[3] history tail
-- KEYS[4] lease to release (or KEYS[1])   ARGV[1] history entry
if KEYS[4] ~= KEYS[1] then redis.call('DEL', KEYS[4]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
append_history(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
return 1
