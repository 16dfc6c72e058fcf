-- History entries numbered ARGV[1] to ARGV[2] (negative: from the end), read atomically
-- from the head list (n < hl) and the tail list (the last hl). Returns {head entries,
-- how many were dropped in between within the range, tail entries}.
-- KEYS[1] record hash {hn, hl}   KEYS[2] history head   KEYS[3] history tail
local total = tonumber(redis.call('HGET', KEYS[1], 'hn') or '0')
local limit = tonumber(redis.call('HGET', KEYS[1], 'hl') or '0')
local s, e = tonumber(ARGV[1]), tonumber(ARGV[2])
if s < 0 then s = math.max(0, s + total) end
if e < 0 then e = e + total else e = math.min(e, total - 1) end
local first_tail = math.max(limit, total - limit)
local head, tail = {}, {}
if s <= math.min(e, limit - 1) then
  head = redis.call('LRANGE', KEYS[2], s, math.min(e, limit - 1))
end
local dropped = math.max(0, math.min(e, first_tail - 1) - math.max(s, limit) + 1)
if math.max(s, first_tail) <= e then
  tail = redis.call('LRANGE', KEYS[3], math.max(s, first_tail) - first_tail, e - first_tail)
end
return {head, dropped, tail}
