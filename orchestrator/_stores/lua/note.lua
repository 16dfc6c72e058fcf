-- Append a history entry to a run that exists, and release a lease.
-- KEYS[1] record hash   KEYS[2] history head   KEYS[3] history tail
-- KEYS[4] lease to release (or KEYS[1])   ARGV[1..3] audit chain (see commit.lua)
-- ARGV[4] history entry. Returns 1 appended, 0 no such run, -1 the audit chain moved on.
if redis.call('EXISTS', KEYS[1]) == 0 then
  if KEYS[4] ~= KEYS[1] then redis.call('DEL', KEYS[4]) end
  return 0
end
if not chain_ok(KEYS[1], ARGV[1], ARGV[2]) then return -1 end
if KEYS[4] ~= KEYS[1] then redis.call('DEL', KEYS[4]) end
append_history(KEYS[1], KEYS[2], KEYS[3], ARGV[4])
chain_head(KEYS[1], ARGV[1], ARGV[3])
return 1
