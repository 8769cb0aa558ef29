"""The Lua scripts of the Redis store (app/store/redis.py): each move of an event or a job is one script, so it is
atomic and one round trip. Their keys are the store's layout (redis.py's docstring); each script says what it
takes (KEYS, ARGV) and returns.
"""

# KEYS: the seen key of each event. ARGV per event, four arguments: a JSON array [its clock and ttl as text, its id,
# tenant, messageId, the vendor of each of its jobs], its jobs as a JSON array of [vendor, target, event name, batch
# key] (kept as it came), its skips as a JSON array of [vendor, reason] ('' for none), then its sealed payload
# (bytes, which JSON cannot carry). Returns 1 (new) or 0 (a duplicate) per event, in order: each event is stored as
# if alone, and a messageId twice in one batch is new only the first time. An event is its idempotency key, its
# hash and one entry in the `accepted` stream with its routes: its jobs' stream entries and trace rows are written
# by the next lease (FAN_OUT, below), off the accept path. The counters are summed over the call and written once
# at its end. Writing the jobs here (a hash and a stream entry per postback, and the trace rows: 13 commands per
# event) took about half of redis-server's CPU per accept (README, 0.13.11).
ACCEPT = """
local pending, queued_bytes, total = {}, {}, 0  -- counters, summed over the call and written once at its end
local function accept(seen_key, head, jobs, skips, payload)
  local seen = redis.call('GET', seen_key)
  local now, ttl = tonumber(head[1]), tonumber(head[2])
  if seen and tonumber(seen) > now then return 0 end
  redis.call('SET', seen_key, tostring(now + ttl), 'PX', math.max(1, math.floor(ttl * 1000)))
  local vendors = head[6]
  local n = #vendors
  if n == 0 then return 1 end
  local event_id, tenant, size = head[3], head[4], string.len(payload)
  redis.call('HSET', 'segrelay:event:' .. event_id, 'tenant', tenant, 'message_id', head[5], 'payload', payload,
    'left', n)
  redis.call('XADD', 'segrelay:accepted', '*', 'e', event_id, 'tn', tenant, 'm', head[5], 'c', head[1], 'x', head[2],
    's', size, 'r', jobs, 'k', skips)
  for _, vendor in ipairs(vendors) do pending[vendor] = (pending[vendor] or 0) + 1 end
  queued_bytes[tenant] = (queued_bytes[tenant] or 0) + size * n
  total = total + size * n
  return 1
end
local fresh = {}
for k = 1, #KEYS do
  fresh[k] = accept(KEYS[k], cjson.decode(ARGV[4 * k - 3]), ARGV[4 * k - 2], ARGV[4 * k - 1], ARGV[4 * k])
end
for vendor, count in pairs(pending) do redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. vendor, count) end
for tenant, added in pairs(queued_bytes) do redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. tenant, added) end
if total > 0 then redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', total) end
return fresh
"""
# A lease's receipt for a job (LEASE makes them): its entry's id in the vendor's `jobs` stream, or `old:` and its id in
# 0.13.10's `stream` of the vendor. Returns the stream, the entry's id and whether it is 0.13.10's (whose jobs have a
# hash of their own).
_RECEIPT = """
local function entry_of(vendor, receipt)
  if string.sub(receipt, 1, 4) == 'old:' then return 'segrelay:stream:' .. vendor, string.sub(receipt, 5), true end
  return 'segrelay:jobs:' .. vendor, receipt, false
end
"""
# A job's entry in its vendor's `jobs` stream carries the job itself, in this order (LEASE reads the values by
# position): id, due, e (its event), t (target), tn (tenant), n (event name), b (batch key), s (size), c (created at),
# a (attempts before this one), m (message id). A job has a hash of its own (job:<id>, the same fields by their full
# names) only while it waits for a retry or is dead. 0.13.10 and before wrote a vendor's `stream` instead, whose
# entries carry only id and due, with the rest in the job's hash: it is only read here (LEASE), never written, so a
# replica of 0.13.10 running beside this one during a rolling upgrade never meets an entry it cannot read (it
# would drop it). A lease's receipt for an entry of that stream is its id prefixed with `old:`.
_ENTRY = """
local function add_entry(vendor, job_id, due, event_id, target, tenant, event_name, batch_key, size, created_at,
                         attempts, message_id)
  redis.call('XADD', 'segrelay:jobs:' .. vendor, '*', 'id', job_id, 'due', due, 'e', event_id, 't', target,
    'tn', tenant, 'n', event_name, 'b', batch_key, 's', size, 'c', created_at, 'a', attempts, 'm', message_id)
end
"""
# The jobs of up to `limit` events of the `accepted` stream, in the order they came: a stream entry per job, and
# the event's trace rows (queued, skipped), expiring with its idempotency key. Inside a script, so each event is
# fanned out once whichever replica leases first. Returns how many events. (Needs _ENTRY before it.)
_FAN_OUT = """
local function fan_out(limit)
  if limit < 1 then return 0 end
  local entries = redis.call('XRANGE', 'segrelay:accepted', '-', '+', 'COUNT', limit)
  if not entries or #entries == 0 then return 0 end
  local done = {}
  for _, entry in ipairs(entries) do
    local f = entry[2]  -- e, tn, m, c, x, s, r, k: values at the even positions
    local event_id, tenant, message_id, now_text, size = f[2], f[4], f[6], f[8], f[12]
    local rows, queued = {}, '{"s":"queued","n":' .. now_text .. '}'
    for k, job in ipairs(cjson.decode(f[14])) do
      add_entry(job[1], event_id .. '.' .. k, now_text, event_id, job[2], tenant, job[3], job[4], size, now_text, 0,
        message_id)
      rows[#rows + 1] = tenant .. '|' .. job[1] .. '|' .. job[2]
      rows[#rows + 1] = queued
    end
    if f[16] ~= '' then
      for _, skip in ipairs(cjson.decode(f[16])) do
        rows[#rows + 1] = tenant .. '|' .. skip[1] .. '|'
        rows[#rows + 1] = cjson.encode({s = 'skipped', d = skip[2], at = tonumber(now_text)})
      end
    end
    local trace = 'segrelay:trace:' .. message_id
    redis.call('HSET', trace, unpack(rows))
    redis.call('PEXPIREAT', trace, math.max(1, math.floor((tonumber(now_text) + tonumber(f[10])) * 1000)))
    done[#done + 1] = entry[1]
  end
  redis.call('XDEL', 'segrelay:accepted', unpack(done))
  return #done
end
"""
# ARGV: limit.
FAN_OUT = _ENTRY + _FAN_OUT + "return fan_out(tonumber(ARGV[1]))"
# ARGV: group, the vendor's status, now, then (job id, vendor, receipt, message id, event id, tenant, target, size,
# attempts) per job. A job counts only if its lease was still the job's: its entry still pending (XACK answers 1),
# or, for a late answer, the job waiting for its retry (which this answer makes needless); a slower replica's late
# answer for a job completed elsewhere changes nothing. One call completes the jobs of a batch of answered requests
# (app/delivery/completions.py) and records them delivered for `trace` (the row's JSON put together here: its status
# and time are the call's, its attempts the job's). The stream entries are deleted by one command per stream for the
# whole call, and the hashes of the jobs that have one (a job of 0.13.10's, or one waiting for its retry: a job in a
# `jobs` stream has none) by one more; the counters, and each event's count of jobs left, are summed over the call
# and written once at its end.
COMPLETE = _RECEIPT + """
local done, pending, queued_bytes, total, left, entries, gone, counted = 0, {}, {}, 0, {}, {}, {}, {}
local row = '{"s":"delivered","st":' .. (ARGV[2] == '' and 'null' or ARGV[2]) .. ',"at":' .. ARGV[3] .. ',"a":'
for i = 4, #ARGV, 9 do
  local job_id, vendor = ARGV[i], ARGV[i + 1]
  local stream, entry, legacy = entry_of(vendor, ARGV[i + 2])
  entries[stream] = entries[stream] or {}
  table.insert(entries[stream], entry)
  local ours, hashed = redis.call('XACK', stream, ARGV[1], entry) == 1, legacy
  if not ours and not counted[job_id] then
    ours = redis.call('ZREM', 'segrelay:delayed:' .. vendor, job_id) == 1
    hashed = true
  end
  if ours and not counted[job_id] then  -- a job named twice in one call counts once
    counted[job_id] = true
    if hashed then table.insert(gone, 'segrelay:job:' .. job_id) end
    local tenant, size = ARGV[i + 5], tonumber(ARGV[i + 7])
    redis.call('HSET', 'segrelay:trace:' .. ARGV[i + 3], tenant .. '|' .. vendor .. '|' .. ARGV[i + 6],
      row .. (tonumber(ARGV[i + 8]) + 1) .. '}')
    left[ARGV[i + 4]] = (left[ARGV[i + 4]] or 0) + 1
    pending[vendor] = (pending[vendor] or 0) + 1
    queued_bytes[tenant] = (queued_bytes[tenant] or 0) + size
    total = total + size
    done = done + 1
  end
end
for stream, ids in pairs(entries) do
  for start = 1, #ids, 1000 do  -- unpack() has a bound on its values
    redis.call('XDEL', stream, unpack(ids, start, math.min(start + 999, #ids)))
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
# KEYS: job, zset (delayed or dead). ARGV: group, the lease's receipt, score, job id, bury (1/0), trace state ('' for
# none), status, body, attempts, message id, vendor, then the job's fields (name, value, ...: the whole job, written to
# its hash). Only a job whose lease was still its own moves (its entry still pending): atomic, so a late answer never
# resurrects a job completed or moved elsewhere.
MOVE = _RECEIPT + """
local stream, entry = entry_of(ARGV[11], ARGV[2])
if redis.call('XACK', stream, ARGV[1], entry) == 0 then return 0 end
redis.call('XDEL', stream, entry)
redis.call('HSET', KEYS[1], unpack(ARGV, 12))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local job = redis.call('HMGET', KEYS[1], 'vendor', 'tenant', 'size', 'target')
if ARGV[6] ~= '' then
  local at = tonumber(ARGV[3])
  redis.call('HSET', 'segrelay:trace:' .. ARGV[10], job[2] .. '|' .. job[1] .. '|' .. job[4], cjson.encode({
    s = ARGV[6], st = tonumber(ARGV[7]), d = ARGV[8], a = tonumber(ARGV[9]), at = ARGV[6] == 'dead' and at or nil,
    n = ARGV[6] ~= 'dead' and at or nil}))
end
if ARGV[5] == '1' then
  redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. job[1], -1)
  redis.call('HINCRBY', 'segrelay:counters', 'dead:' .. job[1], 1)
  redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. job[2], -tonumber(job[3]))
  redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', -tonumber(job[3]))
end
return 1
"""
# The fields of a job's hash that its stream entry carries again, in the entry's order after id and due.
_REQUEUE = """
local function requeue(vendor, job_id, due, attempts)
  local job = redis.call('HMGET', 'segrelay:job:' .. job_id, 'event', 'target', 'tenant', 'event_name', 'batch_key',
    'size', 'created_at', 'attempts', 'message_id', 'died_at')
  if not job[1] then return false end
  local message_id = job[9] or redis.call('HGET', 'segrelay:event:' .. job[1], 'message_id')
  if not message_id then return false end
  add_entry(vendor, job_id, due, job[1], job[2], job[3], job[4], job[5], job[6], job[7], attempts or job[8],
    message_id)
  redis.call('DEL', 'segrelay:job:' .. job_id)
  return job
end
"""
# KEYS: job, dead zset. ARGV: job id, now, vendor.
REPLAY = _ENTRY + _REQUEUE + """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 0 end
local job = requeue(ARGV[3], ARGV[1], ARGV[2], 0)
if not job then return 0 end
local vendor, tenant, size = ARGV[3], job[3], tonumber(job[6])
redis.call('HINCRBY', 'segrelay:counters', 'pending:' .. vendor, 1)
redis.call('HINCRBY', 'segrelay:counters', 'dead:' .. vendor, -1)
redis.call('HINCRBY', 'segrelay:counters', 'bytes:' .. tenant, size)
redis.call('HINCRBY', 'segrelay:counters', 'bytes:*', size)
return 1
"""
# ARGV: vendor, group, consumer, now, limit, min idle ms, where to look for idle entries ('' not this time), how
# many accepted events to fan out first. New events' jobs are written (FAN_OUT), due retries join the stream, a dead
# replica's idle entries are claimed, new ones read; each comes back with its job and its event's payload, in one
# round trip. Entries whose job or event is gone are acknowledged and dropped. Returns {where the look for idle
# entries ended ('0-0': the whole pending list seen; '' none made), the jobs}: XAUTOCLAIM walks up to ten entries of
# the pending list per entry asked for, and made at every lease it took over half of redis-server's CPU for leasing
# (see RedisStore.lease).
LEASE = _ENTRY + _FAN_OUT + _REQUEUE + """
local vendor, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local now, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local stream, delayed = 'segrelay:jobs:' .. vendor, 'segrelay:delayed:' .. vendor
local legacy = 'segrelay:stream:' .. vendor  -- 0.13.10's: read until it is empty, never written
fan_out(tonumber(ARGV[8]))
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #due, 2 do
  redis.call('ZREM', delayed, due[i])
  requeue(vendor, due[i], due[i + 1], nil)
end
local entries = {}
local function take(from, start)
  -- A dead replica's entries idle past the lease, claimed from `start` ('' not this time), then new ones, up to the
  -- limit; where the next look for idle entries starts.
  local next_start = start
  if start ~= '' and #entries < limit then
    local claimed = redis.call('XAUTOCLAIM', from, group, consumer, ARGV[6], start, 'COUNT', limit - #entries)
    next_start = claimed[1]
    for _, entry in ipairs(claimed[2]) do
      if entry and entry[2] then table.insert(entries, entry) end
    end
  end
  if #entries < limit then
    local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', limit - #entries, 'STREAMS', from, '>')
    if read then
      for _, entry in ipairs(read[1][2]) do table.insert(entries, entry) end
    end
  end
  return next_start
end
if redis.call('EXISTS', legacy) == 1 then  -- first: its entries are the older ones, looked through whole
  if not pcall(take, legacy, ARGV[7] ~= '' and '0-0' or '') then
    -- Its group is made by 0.13.10's first lease: a stream only 0.13.10's accepts wrote has none yet.
    redis.call('XGROUP', 'CREATE', legacy, group, '0')
    take(legacy, '')
  end
end
local old = #entries  -- the entries up to here are the legacy stream's
local cursor = take(stream, ARGV[7])
local out, payloads = {}, {}  -- payloads: of the events read in this call (their jobs often come together)
for k, entry in ipairs(entries) do
  local eid, f = entry[1], entry[2]
  local job_id = f[2]
  local job  -- event, target, tenant, event name, batch key, attempts, created at, size, message id
  if #f >= 22 then
    job = {f[6], f[8], f[10], f[12], f[14], f[20], f[18], f[16], f[22]}
  else  -- an entry of 0.13.10 or before: the job is its hash
    local old = redis.call('HMGET', 'segrelay:job:' .. job_id, 'event', 'target', 'tenant', 'event_name', 'batch_key',
      'attempts', 'created_at', 'size', 'died_at')
    if old[1] and not old[9] then
      job = old
      job[9] = redis.call('HGET', 'segrelay:event:' .. old[1], 'message_id')
    end
  end
  local payload = false
  if job and job[9] then
    payload = payloads[job[1]]
    if payload == nil then
      payload = redis.call('HGET', 'segrelay:event:' .. job[1], 'payload')
      payloads[job[1]] = payload
    end
  end
  local from = k <= old and legacy or stream
  if not payload then
    redis.call('XACK', from, group, eid)
    redis.call('XDEL', from, eid)
  else
    local receipt = k <= old and 'old:' .. eid or eid
    table.insert(out, {receipt, job_id, job[1], job[2], job[3], job[4], job[5], job[6], job[7], job[8], job[9],
      payload})
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
