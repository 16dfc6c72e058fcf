-- Compare-and-set a run record and keep its indexes in step, atomically.
-- KEYS[1] record hash {v, doc, fork}   KEYS[2] history list   KEYS[3] lease to release
-- (or KEYS[1])   KEYS[4] due zset   KEYS[5] status hash   KEYS[6] gates set
-- KEYS[7] results of a fork that closes (or KEYS[1])   KEYS[8..] per-approver gate sets
-- ARGV[1] expected version   ARGV[2] doc   ARGV[3] run id   ARGV[4] status
-- ARGV[5] due or ''   ARGV[6] retain seconds once finished (0: forever)
-- ARGV[7] gate op: 'open' | 'close' | ''   ARGV[8] open fork's token or ''
-- ARGV[9..] history entries
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', tostring(tonumber(v) + 1), 'doc', ARGV[2], 'fork', ARGV[8])
for i = 9, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
if KEYS[3] ~= KEYS[1] then redis.call('DEL', KEYS[3]) end
if KEYS[7] ~= KEYS[1] then redis.call('DEL', KEYS[7]) end
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[4], ARGV[3])
else
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[3])
end
redis.call('HSET', KEYS[5], ARGV[3], ARGV[4])
if ARGV[7] == 'open' then
  redis.call('SADD', KEYS[6], ARGV[3])
  for i = 8, #KEYS do redis.call('SADD', KEYS[i], ARGV[3]) end
elseif ARGV[7] == 'close' then
  redis.call('SREM', KEYS[6], ARGV[3])
  for i = 8, #KEYS do redis.call('SREM', KEYS[i], ARGV[3]) end
end
local retain = tonumber(ARGV[6])
if retain > 0 then
  redis.call('EXPIRE', KEYS[1], retain)
  redis.call('EXPIRE', KEYS[2], retain)
end
return 1
