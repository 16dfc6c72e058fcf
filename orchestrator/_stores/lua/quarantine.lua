-- Take a run out of the listings and timers into the corrupt set; its keys stay (and
-- still expire and get purged if it had finished), and so does its id for prefix search.
-- KEYS[1] record hash {wf}   KEYS[2] corrupt set   ARGV[1] run id   ARGV[2] key prefix
unindex(ARGV[2], ARGV[1], redis.call('HGET', KEYS[1], 'wf') or '')
redis.call('SADD', KEYS[2], ARGV[1])
