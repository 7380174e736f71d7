-- One round trip for an assignment: the job, the best free VMs, and the in-flight count.
-- KEYS[1] job hash, KEYS[2] free zset, KEYS[3] inflight zset. ARGV[1] vm key prefix, ARGV[2] how many.
-- Returns {job fields, inflight count, vm1 fields, vm2 fields, ...}.
local out = {redis.call('HGETALL', KEYS[1]), redis.call('ZCARD', KEYS[3])}
local ids = redis.call('ZREVRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
for _, id in ipairs(ids) do
  table.insert(out, redis.call('HGETALL', ARGV[1] .. id))
end
return out
