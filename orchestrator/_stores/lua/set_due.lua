-- Reset a run's timer, only if its record is still at the version the caller read: the
-- sweep decided from that version, and a commit since then set the timer it needs.
-- KEYS[1] record hash {v, ...}   KEYS[2] due zset
-- ARGV[1] expected version   ARGV[2] due or ''   ARGV[3] run id
-- Returns 1 if the timer was set, 0 if the record moved on (or is gone).
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
end
return 1
