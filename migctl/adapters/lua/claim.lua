-- Claim the first still-free candidate VM for a queued job: the Assign decision, atomically.
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] assigned zset, KEYS[4] free zset,
-- KEYS[5] inflight zset, KEYS[6] counters hash, KEYS[7..] candidate VM hashes.
-- ARGV: job_id, job_rev, now, max_inflight, then per candidate: vm_id, vm_rev, needs_registration (1/0).
-- A candidate is still free when its rev is what the caller read (the domain judged it free
-- at that rev) and it holds no job. Returns {1, vm_id}, {0, 'job'} (the job changed),
-- {0, 'limit'} (max_concurrent_assignments in flight) or {0, 'none'} (every candidate taken).
-- On success the third element is the claimed VM's fields after the claim.
local job_rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if job_rev ~= tonumber(ARGV[2]) or redis.call('HGET', KEYS[1], 'state') ~= 'QUEUED' then
  return {0, 'job'}
end
local now = ARGV[3]
local max_inflight = tonumber(ARGV[4])
local limited = false
local i = 5
local k = 7
while ARGV[i] do
  local vm_id, vm_rev, needs_reg = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2] == '1'
  local vm = KEYS[k]
  local rev = tonumber(redis.call('HGET', vm, 'rev') or '0')
  if rev == vm_rev and (redis.call('HGET', vm, 'reserved_job') or '') == '' and (redis.call('HGET', vm, 'job_id') or '') == '' then
    if needs_reg and redis.call('ZCARD', KEYS[5]) >= max_inflight then
      limited = true
    else
      redis.call('HSET', vm, 'reserved_job', ARGV[1], 'reserved_at', now)
      redis.call('HINCRBY', vm, 'rev', 1)
      redis.call('ZREM', KEYS[4], vm_id)
      redis.call('HSET', KEYS[1], 'state', 'ASSIGNED', 'vm_id', vm_id, 'assigned_at', now, 'updated_at', now, 'reason', '')
      redis.call('HINCRBY', KEYS[1], 'rev', 1)
      redis.call('ZREM', KEYS[2], ARGV[1])
      redis.call('ZADD', KEYS[3], now, ARGV[1])
      redis.call('HINCRBY', KEYS[6], 'assigned_jobs', 1)
      return {1, vm_id, redis.call('HGETALL', vm)}
    end
  end
  i = i + 3
  k = k + 1
end
if limited then return {0, 'limit'} end
return {0, 'none'}
