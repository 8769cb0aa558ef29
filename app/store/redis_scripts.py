"""The Lua scripts of the Redis store (app/store/redis.py): each move of an event or a job is one script, so it is
atomic and one round trip. Their keys are the store's layout (redis.py's docstring); each script says what it
takes (KEYS, ARGV) and returns.
"""

# KEYS: the seen key of each event. ARGV per event, two arguments: one JSON array [its clock and ttl as text, its id,
# tenant, messageId, its jobs as [job id, vendor, target, event name, batch key], its skips as [vendor, reason]],
# then its sealed payload (bytes, which JSON cannot carry). Returns 1 (new) or 0 (a duplicate) per event, in order:
# each event is stored as if alone, and a messageId twice in one batch is new only the first time. The counters
# are summed over the call and written once at its end, and an event's trace rows in one HSET: per event, the
# script's commands went from 22 to 13 and redis-server's CPU per accept fell by about a tenth. (redis-py packed
# about 19 µs of arguments per event when each field was an argument of its own.)
ACCEPT = """
local pending, queued_bytes, total = {}, {}, 0  -- counters, summed over the call and written once at its end
local function accept(seen_key, now_text, ttl_text, event_id, tenant, message_id, payload, jobs, skips)
  local seen = redis.call('GET', seen_key)
  local now, ttl = tonumber(now_text), tonumber(ttl_text)
  if seen and tonumber(seen) > now then return 0 end
  redis.call('SET', seen_key, tostring(now + ttl), 'PX', math.max(1, math.floor(ttl * 1000)))
  local n = #jobs
  if n == 0 then return 1 end
  local size = string.len(payload)
  local trace = 'segrelay:trace:' .. message_id
  redis.call('HSET', 'segrelay:event:' .. event_id, 'tenant', tenant, 'message_id', message_id, 'payload', payload,
    'left', n)
  local rows, queued = {}, '{"s":"queued","n":' .. now_text .. '}'
  for _, job in ipairs(jobs) do
    local id, vendor = job[1], job[2]
    redis.call('HSET', 'segrelay:job:' .. id, 'event', event_id, 'vendor', vendor, 'target', job[3],
      'tenant', tenant, 'event_name', job[4], 'batch_key', job[5], 'size', size, 'attempts', 0,
      'created_at', now_text)
    redis.call('XADD', 'segrelay:stream:' .. vendor, '*', 'id', id, 'due', now_text)
    pending[vendor] = (pending[vendor] or 0) + 1
    rows[#rows + 1] = tenant .. '|' .. vendor .. '|' .. job[3]
    rows[#rows + 1] = queued
  end
  for _, skip in ipairs(skips) do
    rows[#rows + 1] = tenant .. '|' .. skip[1] .. '|'
    rows[#rows + 1] = cjson.encode({s = 'skipped', d = skip[2], at = now})
  end
  redis.call('HSET', trace, unpack(rows))
  redis.call('PEXPIRE', trace, math.max(1, math.floor(ttl * 1000)))
  queued_bytes[tenant] = (queued_bytes[tenant] or 0) + size * n
  total = total + size * n
  return 1
end
local fresh = {}
for k = 1, #KEYS do
  local e = cjson.decode(ARGV[2 * k - 1])
  fresh[k] = accept(KEYS[k], e[1], e[2], e[3], e[4], e[5], ARGV[2 * k], e[6], e[7])
end
for vendor, count in pairs(pending) do redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. vendor, count) end
for tenant, added in pairs(queued_bytes) do redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. tenant, added) end
if total > 0 then redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', total) end
return fresh
"""
# ARGV: group, the vendor's status, now, then (job id, vendor, entry id, message id) per job. Only a job that still
# exists counts (a slower replica's late answer for a job completed elsewhere changes nothing). One call completes the
# jobs of a batch of answered requests (app/delivery/completions.py) and records them delivered for `trace`. The
# stream entries are acknowledged and deleted, and the jobs deleted, by one command per stream for the whole call;
# the counters, and each event's count of jobs left, are summed over the call and written once at its end. With
# the message id from the lease instead of a look-up, a job went from 12 commands to about 3 (`bench/delivery.py
# --store redis` prints the commands per event).
COMPLETE = """
local done, pending, queued_bytes, total, left, entries, gone, counted = 0, {}, {}, 0, {}, {}, {}, {}
for i = 4, #ARGV, 4 do
  local job_key, stream = 'segrelay:job:' .. ARGV[i], 'segrelay:stream:' .. ARGV[i + 1]
  entries[stream] = entries[stream] or {}
  table.insert(entries[stream], ARGV[i + 2])
  local job = redis.call('HMGET', job_key, 'event', 'vendor', 'tenant', 'size', 'died_at', 'target', 'attempts')
  if job[1] and not job[5] and not counted[job_key] then  -- a job named twice in one call counts once
    counted[job_key] = true
    table.insert(gone, job_key)
    redis.call('HSET', 'segrelay:trace:' .. ARGV[i + 3], job[3] .. '|' .. job[2] .. '|' .. job[6],
      cjson.encode({s = 'delivered', st = tonumber(ARGV[2]), a = tonumber(job[7]) + 1, at = tonumber(ARGV[3])}))
    left[job[1]] = (left[job[1]] or 0) + 1
    pending[job[2]] = (pending[job[2]] or 0) + 1
    queued_bytes[job[3]] = (queued_bytes[job[3]] or 0) + tonumber(job[4])
    total = total + tonumber(job[4])
    done = done + 1
  end
end
for stream, ids in pairs(entries) do
  for start = 1, #ids, 1000 do  -- unpack() has a bound on its values
    local chunk = {unpack(ids, start, math.min(start + 999, #ids))}
    redis.call('XACK', stream, ARGV[1], unpack(chunk))
    redis.call('XDEL', stream, unpack(chunk))
  end
end
for start = 1, #gone, 1000 do redis.call('DEL', unpack(gone, start, math.min(start + 999, #gone))) end
for event_id, n in pairs(left) do
  local event = 'segrelay:event:' .. event_id
  if redis.call('HINCRBY', event, 'left', -n) <= 0 then redis.call('DEL', event) end
end
for vendor, n in pairs(pending) do redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. vendor, -n) end
for tenant, size in pairs(queued_bytes) do redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. tenant, -size) end
if total > 0 then redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', -total) end
return done
"""
# KEYS: job, zset (delayed or dead), stream. ARGV: group, entry id, score, job id, bury (1/0), trace state
# ('' for none), status, body, attempts, then fields...
MOVE = """
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
local job = redis.call('HMGET', KEYS[1], 'event', 'vendor', 'tenant', 'size', 'died_at', 'target')
if not job[1] or job[5] then return 0 end
if #ARGV > 9 then redis.call('HSET', KEYS[1], unpack(ARGV, 10)) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local message_id = ARGV[6] ~= '' and redis.call('HGET', 'segrelay:event:' .. job[1], 'message_id')
if message_id then
  local at = tonumber(ARGV[3])
  redis.call('HSET', 'segrelay:trace:' .. message_id, job[3] .. '|' .. job[2] .. '|' .. job[6], cjson.encode({
    s = ARGV[6], st = tonumber(ARGV[7]), d = ARGV[8], a = tonumber(ARGV[9]), at = ARGV[6] == 'dead' and at or nil,
    n = ARGV[6] ~= 'dead' and at or nil}))
end
if ARGV[5] == '1' then
  redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. job[2], -1)
  redis.call('HINCRBY', 'segrelay:counters', 'dead:' .. job[2], 1)
  redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. job[3], -tonumber(job[4]))
  redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', -tonumber(job[4]))
end
return 1
"""
# KEYS: job, dead zset, stream. ARGV: job id, now.
REPLAY = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local job = redis.call('HMGET', KEYS[1], 'vendor', 'tenant', 'size')
if not job[1] then return 0 end
redis.call('HSET', KEYS[1], 'attempts', 0, 'created_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'died_at')
redis.call('XADD', KEYS[3], '*', 'id', ARGV[1], 'due', ARGV[2])
redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. job[1], 1)
redis.call('HINCRBY', 'segrelay:counters', 'dead:' .. job[1], -1)
redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. job[2], tonumber(job[3]))
redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', tonumber(job[3]))
return 1
"""
# ARGV: vendor, group, consumer, now, limit, min idle ms, where to look for idle entries ('' not this time). Due
# retries join the stream, a dead replica's idle entries are claimed, new ones read; each comes back with its job and
# its event's payload, in one round trip. Entries whose job is gone (completed elsewhere, or buried) are acknowledged
# and dropped. Returns {where the look for idle entries ended ('0-0': the whole pending list seen; '' none made),
# the jobs}: XAUTOCLAIM walks up to ten entries of the pending list per entry asked for, and made at every lease it
# took over half of redis-server's CPU for leasing (see RedisStore.lease).
LEASE = """
local vendor, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local now, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local stream, delayed = 'segrelay:stream:' .. vendor, 'segrelay:delayed:' .. vendor
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #due, 2 do
  redis.call('ZREM', delayed, due[i])
  redis.call('XADD', stream, '*', 'id', due[i], 'due', due[i + 1])
end
local entries, cursor = {}, ''
if ARGV[7] ~= '' then
  local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[6], ARGV[7], 'COUNT', limit)
  cursor = claimed[1]
  for _, entry in ipairs(claimed[2]) do
    if entry and entry[2] then table.insert(entries, entry) end
  end
end
if #entries < limit then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', limit - #entries, 'STREAMS', stream, '>')
  if read then
    for _, entry in ipairs(read[1][2]) do table.insert(entries, entry) end
  end
end
local out, events = {}, {}  -- events: those read in this call (an event's jobs for one vendor often come together)
for _, entry in ipairs(entries) do
  local eid, job_id = entry[1], entry[2][2]
  local job = redis.call('HMGET', 'segrelay:job:' .. job_id, 'event', 'vendor', 'target', 'tenant', 'event_name',
    'batch_key', 'attempts', 'created_at', 'size', 'died_at')
  local event = {false, false}
  if job[1] then
    event = events[job[1]]
    if not event then
      event = redis.call('HMGET', 'segrelay:event:' .. job[1], 'message_id', 'payload')
      events[job[1]] = event
    end
  end
  if not job[2] or job[10] or not event[2] then
    redis.call('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
  else
    table.insert(out, {eid, job_id, job[1], job[3], job[4], job[5], job[6], job[7], job[8], job[9], event[1],
      event[2]})
  end
end
return {cursor, out}
"""


# ARGV: (key, sealed record, expiry in ms since the epoch, expiry in s) per identity
REMEMBER = """
for i = 1, #ARGV, 4 do
  redis.call('SET', 'segrelay:identity:' .. ARGV[i], ARGV[i + 1], 'PXAT', ARGV[i + 2])
  redis.call('ZADD', 'segrelay:identities', ARGV[i + 3], ARGV[i])
end
return #ARGV / 4
"""
