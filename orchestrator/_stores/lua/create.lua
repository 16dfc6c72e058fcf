-- Create a run unless its id exists (start dedupe), with its index entries.
-- KEYS[1] record hash   KEYS[2] history head   KEYS[3] history tail   KEYS[4] runs
-- KEYS[5] runs:status:<s>   KEYS[6] runs:wf:<w>   KEYS[7] runs:wf:<w>:status:<s>
-- KEYS[8] ids   KEYS[9] due   KEYS[10] expiry   KEYS[11] totals:wf:<w>
-- ARGV[1] run id   ARGV[2] doc   ARGV[3] workflow   ARGV[4] created   ARGV[5] due or ''
-- ARGV[6] history limit   ARGV[7] key prefix   ARGV[8..10] audit chain (see commit.lua)
-- ARGV[11..] history entries, then the outbox (send_outbox)
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
-- A run of the same id expired and the purge has not run yet: forget it now, or the purge
-- would take this run's entries with it.
if redis.call('ZSCORE', KEYS[10], ARGV[1]) then forget(ARGV[7], ARGV[1]) end
local last_arg = send_outbox()
redis.call('HSET', KEYS[1], 'v', '1', 'doc', ARGV[2], 'wf', ARGV[3], 'hl', ARGV[6])
for i = 11, last_arg do append_history(KEYS[1], KEYS[2], KEYS[3], ARGV[i]) end
chain_head(KEYS[1], ARGV[8], ARGV[10])
for i = 4, 7 do redis.call('ZADD', KEYS[i], ARGV[4], ARGV[1]) end
redis.call('ZADD', KEYS[8], 0, ARGV[1])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[9], ARGV[5], ARGV[1]) end
redis.call('HINCRBY', KEYS[11], 'started', 1)
return 1
