-- Take up to ARGV[1] runs whose timer is due, pushing each ARGV[2] seconds ahead so that
-- concurrent sweepers do not take the same run. Uses the server clock.
-- KEYS[1] due zset
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id) end
return ids
