-- Forget up to ARGV[1] runs whose keys expired: their index entries go. Returns how many.
-- KEYS[1] expiry zset (run id -> when its keys expire)   ARGV[1] limit   ARGV[2] key prefix
local t = redis.call('TIME')
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t[1], 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do forget(ARGV[2], id) end
return #ids
