-- Functions shared by the scripts, prepended to each one (RedisStore._script), after a
-- generated line `local STATUSES = {...}` listing every RunStatus value.

-- Append a history entry, numbered n (the run's count so far) by prefixing `"n":n` to its
-- JSON object. The first `hl` entries stay in `head`; later ones go to `tail`, which keeps
-- the last `hl`: O(1) however long the run goes on. A list written after the run finished
-- takes the record's remaining TTL, so it goes with the record.
local function append_history(rec, head, tail, entry)
  local limit = tonumber(redis.call('HGET', rec, 'hl'))
  if limit == nil then  -- a run written before histories were capped: number on from it
    limit = 1000
    redis.call('HSET', rec, 'hl', limit, 'hn', redis.call('LLEN', head))
  end
  local n = redis.call('HINCRBY', rec, 'hn', 1) - 1
  local stamped = '{"n":' .. n .. (entry == '{}' and '}' or ',' .. string.sub(entry, 2))
  local list = head
  if n >= limit then list = tail end
  redis.call('RPUSH', list, stamped)
  if n >= 2 * limit then redis.call('LPOP', tail) end
  local ttl = redis.call('PTTL', rec)
  if ttl > 0 then redis.call('PEXPIRE', list, ttl) end
end

-- The audit chain (orchestrator/_audit.py): the caller seals entries for the positions
-- from `first` on, after the entry whose mac is `prev`, and they may only be appended
-- there. False if another append came first: the caller writes nothing, seals again and
-- retries. `first` '' means the entries are not sealed (no audit key).
local function chain_ok(rec, first, prev)
  if first == '' then return true end
  local hn = redis.call('HGET', rec, 'hn') or '0'
  local hm = redis.call('HGET', rec, 'hm') or ''
  return hn == first and hm == prev
end

local function chain_head(rec, first, last)
  if first ~= '' then redis.call('HSET', rec, 'hm', last) end
end

-- Take a run out of the listings and timers. Keys are built here because which ones hold
-- the run depends on its workflow, read from the store (see the key schema in redis.py).
local function unindex(prefix, id, workflow)
  redis.call('ZREM', prefix .. 'runs', id)
  redis.call('ZREM', prefix .. 'runs:wf:' .. workflow, id)
  for _, s in ipairs(STATUSES) do
    redis.call('ZREM', prefix .. 'runs:status:' .. s, id)
    redis.call('ZREM', prefix .. 'runs:wf:' .. workflow .. ':status:' .. s, id)
  end
  redis.call('ZREM', prefix .. 'due', id)
  redis.call('SREM', prefix .. 'gates', id)
  redis.call('ZREM', prefix .. 'waits:wf:' .. workflow .. ':gate', id)
  redis.call('ZREM', prefix .. 'waits:wf:' .. workflow .. ':event', id)
end

-- Drop every index entry of a run whose keys expired.
local function forget(prefix, id)
  local workflow = redis.call('HGET', prefix .. 'expiry:workflow', id) or ''
  unindex(prefix, id, workflow)
  redis.call('ZREM', prefix .. 'ids', id)
  redis.call('SREM', prefix .. 'corrupt', id)
  redis.call('ZREM', prefix .. 'expiry', id)
  redis.call('HDEL', prefix .. 'expiry:workflow', id)
end

-- The messages a create or a commit sends when the broker is this same Redis, written in
-- the same atomic step as the run (so a committed transition and its messages stand or
-- fall together). The last ARGV is how many writes n; the 3n ARGV before it are
-- (op, name, value): 'push' LPUSHes a task message onto queue `name`, as kombu's Redis
-- transport does; 'publish' publishes on channel `name` (the run's end), and only tries
-- (an ACL may deny the channel). Those who hear it read the run after the script, so it
-- need not come last. The queues are arguments, not KEYS: Redis checks a script's KEYS
-- for reading and writing, and an app's user may only write to queues (docs/operations.md).
-- Returns where the caller's own ARGV end.
local function send_outbox()
  local n = tonumber(ARGV[#ARGV])
  local a0 = #ARGV - 1 - 3 * n
  for i = 0, n - 1 do
    local op, name, value = ARGV[a0 + 3 * i + 1], ARGV[a0 + 3 * i + 2], ARGV[a0 + 3 * i + 3]
    if op == 'push' then
      redis.call('LPUSH', name, value)
    else
      redis.pcall('PUBLISH', name, value)
    end
  end
  return a0
end
