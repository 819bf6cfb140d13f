"""Lua scripts of the distributed store. Each runs on the keys of one connection, which share
the hash tag ``{<connection>}``, so every change to a connection is atomic and legal on a cluster.

Keys of a connection (KEYS, in this order, see ``ConnectionKeys``):

1. ``p`` pending: ZSET id -> sequence number (oldest first)
2. ``l`` leased: ZSET id -> lease end (epoch ms)
3. ``h`` holders: HASH id -> "<instance>/<socket>"
4. ``m`` meta: HASH id -> JSON ``[seq, receivedAt, size, [recipient dids]]``
5. ``b`` bodies: HASH id -> payload JSON (absent once the persister moved it to MongoDB), and
   "<id>#" while a copy to MongoDB may exist but the body is still here
6. ``s`` session: HASH sid, inst, sock, away, at
7. ``n`` sequence counter
8. ``t`` the push held back while the session's socket is away: JSON {type, token, id}

Each script's reply is decoded by the function of the same name in ``replies.py``.

Liveness: scripts get the JSON list of live instances and a cutoff; a session or lease of an
instance not in the list is dead unless it was made after the cutoff (a new instance may not yet
be in every caller's cached list).
"""

from __future__ import annotations

from mpr_server.redis import Script

PRELUDE = r"""
local KP, KL, KH, KM, KB, KS, KN, KT = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local function live_set(json)
  local set = {}
  for _, name in ipairs(cjson.decode(json)) do set[name] = true end
  return set
end

local function instance_of(holder)
  return string.match(holder, '^([^/]*)/')
end

-- The session as {sid, inst, sock, away, at}, or nil; a session of a dead instance is dropped.
local function session(live, cutoff)
  local s = redis.call('HMGET', KS, 'sid', 'inst', 'sock', 'away', 'at')
  if not s[2] then return nil end
  if not live[s[2]] and tonumber(s[5]) < cutoff then
    redis.call('DEL', KS, KT)
    return nil
  end
  return s
end

local function release(id)
  redis.call('ZREM', KL, id)
  redis.call('HDEL', KH, id)
  local meta = redis.call('HGET', KM, id)
  if meta then redis.call('ZADD', KP, cjson.decode(meta)[1], id) end
end

-- Ids of leases that ended or whose holder is dead (pending again from a reader's view).
local function stale_leases(live, cutoff, now, lease_ms)
  local out = {}
  local all = redis.call('ZRANGE', KL, 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    local id, ends = all[i], tonumber(all[i + 1])
    local holder = redis.call('HGET', KH, id)
    local alive = holder and (live[instance_of(holder)] or ends - lease_ms >= cutoff)
    if ends <= now or not alive then out[#out + 1] = id end
  end
  return out
end

-- Release those leases; return their ids.
local function release_stale(live, cutoff, now, lease_ms)
  local out = stale_leases(live, cutoff, now, lease_ms)
  for _, id in ipairs(out) do release(id) end
  return out
end

local function lease_to(id, holder, ends)
  redis.call('ZREM', KP, id)
  redis.call('ZADD', KL, ends, id)
  redis.call('HSET', KH, id, holder)
end

-- id, receivedAt, body (false when in MongoDB) of each id, flattened
local function describe(ids)
  local out = {}
  for _, id in ipairs(ids) do
    local meta = redis.call('HGET', KM, id)
    if meta then
      out[#out + 1] = id
      out[#out + 1] = cjson.decode(meta)[2]
      out[#out + 1] = redis.call('HGET', KB, id)
    end
  end
  return out
end

local function addressed_to(meta, did)
  if did == '' then return true end
  for _, d in ipairs(meta[4]) do
    if d == did then return true end
  end
  return false
end

local function forget(id)
  -- delete a message; true if MongoDB may hold a copy (moved, or a move was under way)
  redis.call('ZREM', KP, id)
  redis.call('ZREM', KL, id)
  redis.call('HDEL', KH, id)
  local in_redis = redis.call('HDEL', KB, id)
  local copying = redis.call('HDEL', KB, id .. '#')
  redis.call('HDEL', KM, id)
  return in_redis == 0 or copying == 1
end

-- the ids that still exist, oldest first
local function in_queue_order(ids)
  local pairs_ = {}
  for _, id in ipairs(ids) do
    local meta = redis.call('HGET', KM, id)
    if meta then pairs_[#pairs_ + 1] = {cjson.decode(meta)[1], id} end
  end
  table.sort(pairs_, function(a, b) return a[1] < b[1] end)
  local sorted = {}
  for i, pair in ipairs(pairs_) do sorted[i] = pair[2] end
  return sorted
end

local function oldest_lease()
  local first = redis.call('ZRANGE', KL, 0, 0, 'WITHSCORES')
  if #first == 0 then return false end
  return tonumber(first[2])
end
"""


def _script(body: str) -> Script:
    return Script(PRELUDE + body)


# ARGV: id, receivedAt, size, dids_json, payload, until, live, cutoff, max_queued (0: no cap),
#       push token JSON ('' for none; kept when the session is away)
# -> {'d', inst, sock} leased to a live session | {'h', inst, sock} session away | {'n'} | {'full'}
ADD = _script(r"""
local id = ARGV[1]
local cap = tonumber(ARGV[9])
if cap > 0 and redis.call('HLEN', KM) >= cap then return {'full'} end
local seq = redis.call('INCR', KN)
redis.call('HSET', KM, id, '[' .. seq .. ',' .. ARGV[2] .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ']')
redis.call('HSET', KB, id, ARGV[5])
local s = session(live_set(ARGV[7]), tonumber(ARGV[8]))
if s and s[4] ~= '1' then
  redis.call('ZADD', KL, ARGV[6], id)
  redis.call('HSET', KH, id, s[2] .. '/' .. s[3])
  return {'d', s[2], s[3]}
end
redis.call('ZADD', KP, seq, id)
if s then
  if ARGV[10] ~= '' then redis.call('SET', KT, ARGV[10]) end
  return {'h', s[2], s[3]}
end
return {'n'}
""")

# ARGV: did, limit, limit_bytes, delete, holder, now, until, live, cutoff, lease_ms
# -> {offloaded_ids_json, id, receivedAt, body, ...}
TAKE = _script(r"""
local did, limit, limit_bytes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local delete, holder, ends = ARGV[4] == '1', ARGV[5], tonumber(ARGV[7])
release_stale(live_set(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[6]), tonumber(ARGV[10]))
local taken, total, start = {}, 0, 0
local done = false
while not done do
  local ids = redis.call('ZRANGE', KP, start, start + 99)
  if #ids == 0 then break end
  start = start + #ids
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', KM, id)
    if raw then
      local meta = cjson.decode(raw)
      if addressed_to(meta, did) then
        local size, take = meta[3], true
        if limit_bytes > 0 then
          if size > limit_bytes then
            take = false
          elseif total + size > limit_bytes then
            done = true
            break
          else
            total = total + size
          end
        end
        if take then
          taken[#taken + 1] = id
          if limit > 0 and #taken >= limit then
            done = true
            break
          end
        end
      end
    end
  end
end
local out = describe(taken)
local offloaded = {}
for _, id in ipairs(taken) do
  if delete then
    if forget(id) then offloaded[#offloaded + 1] = id end
  elseif holder ~= '' then
    lease_to(id, holder, ends)
  end
end
table.insert(out, 1, cjson.encode(offloaded))
return out
""")

# ARGV: did, now, live, cutoff, lease_ms -> pending count. Read-only: stale leases count as
# pending but are left for the sweeper, which redelivers them to a live session.
COUNT = _script(r"""
local did = ARGV[1]
local stale = stale_leases(live_set(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[2]), tonumber(ARGV[5]))
if did == '' then return redis.call('ZCARD', KP) + #stale end
local n, start = 0, 0
for _, id in ipairs(stale) do
  local raw = redis.call('HGET', KM, id)
  if raw and addressed_to(cjson.decode(raw), did) then n = n + 1 end
end
while true do
  local ids = redis.call('ZRANGE', KP, start, start + 199)
  if #ids == 0 then break end
  start = start + #ids
  for _, id in ipairs(ids) do
    local raw = redis.call('HGET', KM, id)
    if raw and addressed_to(cjson.decode(raw), did) then n = n + 1 end
  end
end
return n
""")

# ARGV: id... -> {how many were removed, JSON list of removed ids whose body was in MongoDB}
REMOVE = _script(r"""
local offloaded, removed = {}, 0
for _, id in ipairs(ARGV) do
  if redis.call('HEXISTS', KM, id) == 1 then
    removed = removed + 1
    if forget(id) then offloaded[#offloaded + 1] = id end
  end
end
return {removed, cjson.encode(offloaded)}
""")

# ARGV: did -> JSON list of removed ids whose body was in MongoDB
REMOVE_ALL = _script(r"""
local did = ARGV[1]
local offloaded, doomed = {}, {}
local ids = redis.call('HKEYS', KM)
for _, id in ipairs(ids) do
  if addressed_to(cjson.decode(redis.call('HGET', KM, id)), did) then doomed[#doomed + 1] = id end
end
for _, id in ipairs(doomed) do
  if forget(id) then offloaded[#offloaded + 1] = id end
end
return cjson.encode(offloaded)
""")

# ARGV: sid, inst, sock, now, until -> {id, receivedAt, body, ...} re-leased to the new holder
ADD_SESSION = _script(r"""
local holder = ARGV[2] .. '/' .. ARGV[3]
redis.call('DEL', KS, KT)
redis.call('HSET', KS, 'sid', ARGV[1], 'inst', ARGV[2], 'sock', ARGV[3], 'away', '0', 'at', ARGV[4])
local ids = redis.call('ZRANGE', KL, 0, -1)
for _, id in ipairs(ids) do
  redis.call('ZADD', KL, ARGV[5], id)
  redis.call('HSET', KH, id, holder)
end
return describe(in_queue_order(ids))
""")

# ARGV: holder, sid ('' = by holder) -> 1 removed | 0
REMOVE_SESSION = _script(r"""
local holder, sid = ARGV[1], ARGV[2]
local s = redis.call('HMGET', KS, 'sid', 'inst', 'sock')
if not s[2] then return 0 end
local owner = s[2] .. '/' .. s[3]
if sid ~= '' then
  if s[1] ~= sid then return 0 end
elseif owner ~= holder then
  return 0
end
redis.call('DEL', KS, KT)
local ids = redis.call('ZRANGE', KL, 0, -1)
for _, id in ipairs(ids) do
  if redis.call('HGET', KH, id) == owner then release(id) end
end
return 1
""")

# ARGV: live, cutoff -> 1 | 0
HAS_SESSION = _script(r"""
if session(live_set(ARGV[1]), tonumber(ARGV[2])) then return 1 end
return 0
""")

# Lease to the present live session the given (just released) ids, in queue order.
REDELIVER = r"""
local function redeliver(released, live, cutoff, ends, skip)
  if #released == 0 then return {} end
  local s = session(live, cutoff)
  if not s or s[4] == '1' then return {} end
  local holder = s[2] .. '/' .. s[3]
  if holder == skip then return {} end
  local ids = in_queue_order(released)
  for _, id in ipairs(ids) do lease_to(id, holder, ends) end
  local out = describe(ids)
  table.insert(out, 1, s[3])
  table.insert(out, 1, s[2])
  return out
end
"""

# ARGV: now, until, live, cutoff, lease_ms
# -> {next lease end or false, [inst, sock, id, receivedAt, body, ...]}
RELEASE_EXPIRED = _script(
    REDELIVER
    + r"""
local live, cutoff = live_set(ARGV[3]), tonumber(ARGV[4])
local released = release_stale(live, cutoff, tonumber(ARGV[1]), tonumber(ARGV[5]))
local out = redeliver(released, live, cutoff, tonumber(ARGV[2]), '')
table.insert(out, 1, oldest_lease())
return out
"""
)

# ARGV: holder, keep ('1'|'0'), until, live, cutoff
# -> {dropped (1|0), held push JSON or false, next lease end or false,
#     [inst, sock, id, receivedAt, body, ...]}
RELEASE_HOLDER = _script(
    REDELIVER
    + r"""
local holder, keep = ARGV[1], ARGV[2] == '1'
local live, cutoff = live_set(ARGV[4]), tonumber(ARGV[5])
local released = {}
local ids = redis.call('ZRANGE', KL, 0, -1)
for _, id in ipairs(ids) do
  if redis.call('HGET', KH, id) == holder then
    release(id)
    released[#released + 1] = id
  end
end
local dropped, held = 0, false
local s = redis.call('HMGET', KS, 'inst', 'sock')
if s[1] and s[1] .. '/' .. s[2] == holder then
  if keep then
    redis.call('HSET', KS, 'away', '1')
  else
    held = redis.call('GET', KT)
    redis.call('DEL', KS, KT)
    dropped = 1
  end
end
local out = redeliver(released, live, cutoff, tonumber(ARGV[3]), holder)
table.insert(out, 1, oldest_lease())
table.insert(out, 1, held)
table.insert(out, 1, dropped)
return out
"""
)

# ARGV: holder, until -> {id, receivedAt, body, ...} leased to the returning holder
ATTACH = _script(r"""
local holder = ARGV[1]
local s = redis.call('HMGET', KS, 'inst', 'sock')
if not s[1] or s[1] .. '/' .. s[2] ~= holder then return {} end
redis.call('HSET', KS, 'away', '0')
redis.call('DEL', KT)
local ids = redis.call('ZRANGE', KP, 0, -1)
for _, id in ipairs(ids) do lease_to(id, holder, ARGV[2]) end
return describe(ids)
""")

# ARGV: id -> {meta, body} when the message is still here with its body, else {}. Marks the
# message "copy may exist in MongoDB" (field "<id>#") so that a removal also cleans MongoDB.
OFFLOAD_READ = _script(r"""
local meta = redis.call('HGET', KM, ARGV[1])
local body = redis.call('HGET', KB, ARGV[1])
if not meta or not body then return {} end
redis.call('HSET', KB, ARGV[1] .. '#', '1')
return {meta, body}
""")

# ARGV: id -> 1 body dropped (now only in MongoDB) | 0 message gone meanwhile
OFFLOAD_DONE = _script(r"""
if redis.call('HEXISTS', KM, ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KB, ARGV[1], ARGV[1] .. '#')
return 1
""")

# Messages of an original deployment (upgrade.py), put back in the queue in the order given,
# after those imported before and ahead of everything queued since the upgrade: their sequence
# numbers are negative, counting up from -1e12. ARGV: groups of (id, receivedAt, size, dids_json,
# body or '' when the payload stays in MongoDB, '1' when MongoDB also holds a copy else '')
# -> how many were queued (an id already known is skipped)
IMPORT = _script(r"""
local top = redis.call('ZREVRANGEBYSCORE', KP, '(0', '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
local seq = -1000000000000
if #top > 0 then seq = tonumber(top[2]) end
local n = 0
for i = 1, #ARGV, 6 do
  local id = ARGV[i]
  if redis.call('HEXISTS', KM, id) == 0 then
    seq = seq + 1
    redis.call('HSET', KM, id, '[' .. seq .. ',' .. ARGV[i + 1] .. ',' .. ARGV[i + 2] .. ',' .. ARGV[i + 3] .. ']')
    if ARGV[i + 4] ~= '' then
      redis.call('HSET', KB, id, ARGV[i + 4])
      if ARGV[i + 5] == '1' then redis.call('HSET', KB, id .. '#', '1') end
    end
    redis.call('ZADD', KP, seq, id)
    n = n + 1
  end
end
return n
""")

# Scripts on one key (KEYS[1]), outside any connection.
# Give back a claim (lock) only if it is still ours. ARGV: our token.
UNLOCK = Script(r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# Extend a claim (lock) only if it is still ours. ARGV: our token, ttl ms -> 1 | 0 lost
RENEW = Script(r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
""")

# An original deployment's list (upgrade.py): remove the entries given, each once, from the head
# on (where they are). ARGV: the entries -> how many were removed
LIST_REMOVE = Script(r"""
local n = 0
for _, entry in ipairs(ARGV) do n = n + redis.call('LREM', KEYS[1], 1, entry) end
return n
""")

# Lease-due index: ARGV now, then (connection, lease end) pairs. Keep the earliest end, but
# replace an entry that is already due (the sweeper may be about to drop it).
INDEX_LEASES = Script(r"""
local now = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  local ends = tonumber(ARGV[i + 1])
  if not s or tonumber(s) > ends or tonumber(s) <= now then
    redis.call('ZADD', KEYS[1], ends, ARGV[i])
  end
end
return 0
""")

# After a sweep of a connection: ARGV connection, score seen, next lease end ('' = none).
INDEX_SWEPT = Script(r"""
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or s ~= ARGV[2] and tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
""")
