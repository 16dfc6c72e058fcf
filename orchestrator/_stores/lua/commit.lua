-- Compare-and-set a run record and keep its indexes in step, atomically.
-- KEYS[1] record hash {v, doc, fork, wf, hn, hl}   KEYS[2] history head   KEYS[3] tail
-- KEYS[4] lease to release (or KEYS[1])   KEYS[5] results of a fork that closes (or KEYS[1])
-- KEYS[6] due   KEYS[7] gates   KEYS[8] runs:status:<previous>   KEYS[9] runs:status:<new>
-- KEYS[10] runs:wf:<w>:status:<previous>   KEYS[11] runs:wf:<w>:status:<new>
-- KEYS[12] expiry   KEYS[13] expiry:workflow   KEYS[14] totals:wf:<w>
-- KEYS[15] waits:wf:<w>:gate   KEYS[16] waits:wf:<w>:event   KEYS[17..] per-approver gate sets
-- ARGV[1] expected version   ARGV[2] doc   ARGV[3] run id   ARGV[4] created
-- ARGV[5] due or ''   ARGV[6] retain seconds once finished (0: not finished)
-- ARGV[7] gate op: 'open' | 'close' | ''   ARGV[8] open fork's token or ''
-- ARGV[9] workflow   ARGV[10] the status the run ends in with this commit, or ''
-- ARGV[11] gate wait, ARGV[12] event wait: '' unchanged, '-' over, else when it began
-- ARGV[13] audit chain: first position or ''   ARGV[14] previous mac
-- ARGV[15] the last entry's mac   ARGV[16..] history entries, then the outbox (send_outbox)
-- Returns 1 committed, 0 the version moved on, -1 the audit chain did (retry the same).
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[1] then return 0 end
if not chain_ok(KEYS[1], ARGV[13], ARGV[14]) then return -1 end
local id = ARGV[3]
local last_arg = send_outbox()
redis.call('HSET', KEYS[1], 'v', tostring(tonumber(v) + 1), 'doc', ARGV[2], 'fork', ARGV[8])
for i = 16, last_arg do append_history(KEYS[1], KEYS[2], KEYS[3], ARGV[i]) end
chain_head(KEYS[1], ARGV[13], ARGV[15])
if KEYS[4] ~= KEYS[1] then redis.call('DEL', KEYS[4]) end
if KEYS[5] ~= KEYS[1] then redis.call('DEL', KEYS[5]) end
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[6], id)
else
  redis.call('ZADD', KEYS[6], ARGV[5], id)
end
if KEYS[8] ~= KEYS[9] then
  redis.call('ZREM', KEYS[8], id)
  redis.call('ZREM', KEYS[10], id)
  redis.call('ZADD', KEYS[9], ARGV[4], id)
  redis.call('ZADD', KEYS[11], ARGV[4], id)
end
if ARGV[7] == 'open' then
  redis.call('SADD', KEYS[7], id)
  for i = 17, #KEYS do redis.call('SADD', KEYS[i], id) end
elseif ARGV[7] == 'close' then
  redis.call('SREM', KEYS[7], id)
  for i = 17, #KEYS do redis.call('SREM', KEYS[i], id) end
end
if ARGV[10] ~= '' then redis.call('HINCRBY', KEYS[14], ARGV[10], 1) end
for k = 0, 1 do
  local op = ARGV[11 + k]
  if op == '-' then
    redis.call('ZREM', KEYS[15 + k], id)
  elseif op ~= '' then
    redis.call('ZADD', KEYS[15 + k], op, id)
  end
end
local retain = tonumber(ARGV[6])
if retain > 0 then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], retain) end
  -- A second's margin: the purge must never find the record still there.
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[12], tonumber(t[1]) + retain + 1, id)
  redis.call('HSET', KEYS[13], id, ARGV[9])
end
return 1
