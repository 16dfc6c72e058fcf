-- Record one branch's result if its fork is still open, without touching the record.
-- KEYS[1] record hash (field 'fork': the open fork's token)   KEYS[2] the fork's results
-- KEYS[3] history head   KEYS[4] history tail   KEYS[5] lease to release   KEYS[6] due zset
-- ARGV[1] fork token   ARGV[2] branch   ARGV[3] result   ARGV[4] history entry
-- ARGV[5] number of branches   ARGV[6] run id   ARGV[7] when to join if the join is lost
-- ARGV[8..10] audit chain (see commit.lua)
-- Returns results recorded so far; -1 the fork is closed; -2 this branch was recorded
-- already; -3 the audit chain moved on (nothing written: retry).
if redis.call('HGET', KEYS[1], 'fork') ~= ARGV[1] then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return -2 end
if not chain_ok(KEYS[1], ARGV[8], ARGV[9]) then return -3 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
append_history(KEYS[1], KEYS[3], KEYS[4], ARGV[4])
chain_head(KEYS[1], ARGV[8], ARGV[10])
redis.call('DEL', KEYS[5])
local n = redis.call('HLEN', KEYS[2])
if n >= tonumber(ARGV[5]) then redis.call('ZADD', KEYS[6], 'LT', ARGV[7], ARGV[6]) end
return n
