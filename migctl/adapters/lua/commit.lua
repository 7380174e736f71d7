-- One atomic write of a domain Change: compare every record's revision, then apply.
-- KEYS: every key the ops touch (declared for Redis Cluster; all share the pool's hash tag).
-- ARGV[1]: JSON {check=[[key, rev]], put=[[key, [f, v, ...]]], del=[key], zadd=[[key, score, member]],
--   zrem=[[key, member]], sadd=[[key, member]], srem=[[key, member]], rpush=[[key, value]],
--   hset=[[key, field, value]], expire=[[key, seconds]], incr=[[key, field, n]], trim=[[key, keep]],
--   publish=[[channel, message]]}
-- rev 0 in `check` means "must not exist". `put` bumps the record's rev.
-- Returns {1} on success or {0, key} naming the first record that changed underneath.
local ops = cjson.decode(ARGV[1])
for _, c in ipairs(ops.check or {}) do
  local cur = tonumber(redis.call('HGET', c[1], 'rev') or '0')
  if cur ~= tonumber(c[2]) then return {0, c[1]} end
end
for _, p in ipairs(ops.put or {}) do
  redis.call('HSET', p[1], unpack(p[2]))
  redis.call('HINCRBY', p[1], 'rev', 1)
end
for _, k in ipairs(ops.del or {}) do redis.call('DEL', k) end
for _, z in ipairs(ops.zadd or {}) do redis.call('ZADD', z[1], z[2], z[3]) end
for _, z in ipairs(ops.zrem or {}) do redis.call('ZREM', z[1], z[2]) end
for _, s in ipairs(ops.sadd or {}) do redis.call('SADD', s[1], s[2]) end
for _, s in ipairs(ops.srem or {}) do redis.call('SREM', s[1], s[2]) end
for _, r in ipairs(ops.rpush or {}) do redis.call('RPUSH', r[1], r[2]) end
for _, h in ipairs(ops.hset or {}) do redis.call('HSET', h[1], h[2], h[3]) end
for _, e in ipairs(ops.expire or {}) do redis.call('EXPIRE', e[1], e[2]) end
for _, i in ipairs(ops.incr or {}) do redis.call('HINCRBY', i[1], i[2], i[3]) end
for _, t in ipairs(ops.trim or {}) do redis.call('ZREMRANGEBYRANK', t[1], 0, -(tonumber(t[2]) + 1)) end
for _, m in ipairs(ops.publish or {}) do redis.call('PUBLISH', m[1], m[2]) end
return {1}
