-- Load a run and take a task's lease, in one command: the store's clock, the record, the
-- lease (SET PX) and how often this (task, attempt) began (a counter that outlives it).
-- KEYS[1] record hash {v, doc}   KEYS[2] lease   KEYS[3] starts counter
-- ARGV[1] lease TTL (ms)   ARGV[2] seconds the counter lives from its last start
-- Returns {seconds, microseconds, v or nil, doc or nil, starts}.
local t = redis.call('TIME')
local rec = redis.call('HMGET', KEYS[1], 'v', 'doc')
redis.call('SET', KEYS[2], 1, 'PX', ARGV[1])
local starts = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return {t[1], t[2], rec[1], rec[2], starts}
