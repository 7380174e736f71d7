-- An agent acked a command: drop it from the VM's outbox and remember the outcome a while.
-- KEYS[1] outbox list, KEYS[2] command payloads hash, KEYS[3] ack record.
-- ARGV[1] command id, ARGV[2] outcome JSON, ARGV[3] ttl seconds. Returns 1 if it was pending.
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
-- The first ack's outcome is the one applied; a replayed ack must not overwrite it.
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3], 'NX')
return removed
