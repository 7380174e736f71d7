-- Coalesced heartbeats: set last_heartbeat on VMs that still exist (a deleted VM's late
-- heartbeat must not resurrect its record). KEYS: vm hashes; ARGV: matching timestamps.
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'last_heartbeat', ARGV[i])
    n = n + 1
  end
end
return n
