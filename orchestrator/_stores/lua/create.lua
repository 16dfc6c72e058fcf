-- Create a run unless its id exists (start dedupe).
-- KEYS[1] record hash {v, doc}   KEYS[2] history list   KEYS[3] runs zset (id -> created)
-- KEYS[4] status hash (id -> status)   KEYS[5] due zset (id -> when the sweep looks)
-- ARGV[1] run id   ARGV[2] doc   ARGV[3] status   ARGV[4] created   ARGV[5] due or ''
-- ARGV[6..] history entries
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', '1', 'doc', ARGV[2])
for i = 6, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1]) end
return 1
