-- Create a job record unless one exists (intake is idempotent on job id).
-- KEYS[1] job hash, KEYS[2] queue zset, KEYS[3] counters hash, KEYS[4] the job's timeline.
-- ARGV[1] queue score ('' = not queued), ARGV[2] timeline TTL, ARGV[3] received,
-- ARGV[4] queued (times), ARGV[5..] field, value pairs.
-- Returns 1 when created, 0 when the job was already known.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rev', 1, unpack(ARGV, 5))
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[2], ARGV[1], redis.call('HGET', KEYS[1], 'id')) end
redis.call('HINCRBY', KEYS[3], 'jobs_received', 1)
redis.call('HSET', KEYS[4], 'received', ARGV[3], 'queued', ARGV[4])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
