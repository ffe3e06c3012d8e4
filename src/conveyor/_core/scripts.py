"""Lua for the steps that must be atomic on the server.

Each script touches only keys in one hash slot (the stream and keys derived from it with the same
hash tag), so it also runs on a Redis Cluster. Times come from the server's clock (``TIME``), so
consumers on hosts whose clocks disagree still agree on who is alive. Every claim checks who owns
an entry inside the script: two reclaimers can never both take it.
"""

from __future__ import annotations

from conveyor.models import PROVENANCE_FIELDS

__all__ = [
    "ACK_IF_MINE",
    "BEAT_OF",
    "CREATE_GROUP",
    "DEAD_LETTER",
    "DEAD_LETTER_UNHELD",
    "FORWARD",
    "GIVE_UP",
    "HEARTBEAT",
    "IDEMPOTENT_ADD",
    "PROVENANCE_FIELDS",
    "RECLAIM",
    "REMOVE_IF_IDLE",
    "REREAD",
    "TAKE_BACK",
]

#: Every command a script runs goes through ``call``: an error names the command, and an ACL
#: refusal becomes ``NOPERM`` naming it (Redis 7.0 says only "The user executing the script
#: can't run this command or subcommand").
_CALL = """
local function call(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    local name = string.upper(tostring((...)))
    if string.find(r.err, 'ACL', 1, true) or string.find(r.err, 'NOPERM', 1, true)
        or string.find(r.err, "can't run this command", 1, true) then
      r.err = 'NOPERM this user has no permissions to run the ' .. name
        .. ' command (' .. r.err .. ')'
    else
      r.err = r.err .. ' (in ' .. name .. ')'
    end
    error(r)
  end
  return r
end
--- The ids in ARGV[first..] still pending for the group (ARGV[1]) in the stream (KEYS[1]):
--- those the consumer (ARGV[2]) owns, and those another consumer owns now.
local function owned(first)
  local mine, others = {}, {}
  for i = first, #ARGV do
    local p = call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if #p == 1 then
      if p[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] else others[#others + 1] = ARGV[i] end
    end
  end
  return mine, others
end
--- Lua's unpack() has a stack limit (about 8,000 values): claim in chunks.
local CHUNK = 1000
local function chunks(ids, fn)
  for i = 1, #ids, CHUNK do
    local part = {}
    for j = i, math.min(i + CHUNK - 1, #ids) do part[#part + 1] = ids[j] end
    fn(part)
  end
end
"""

_NOW_MS = (
    _CALL
    + """
local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ms_text(ms)
  return string.format('%d', ms)
end
"""
)

#: A heartbeat value is ``<server ms>:<timeout ms>``: each consumer says how long its silence
#: may last, so consumers and monitors with other settings judge it by its own. A plain number
#: (an older format) is judged by the caller's timeout.
BEAT_OF = """
local function beat_of(value, default_timeout)
  if not value then return nil, nil end
  local beat, timeout = string.match(value, '^(%d+):(%d+)$')
  if beat then return tonumber(beat), tonumber(timeout) end
  return tonumber(value), tonumber(default_timeout)
end
"""

#: Claimed entries come back as {ids..., deliveries...} beside the entries, because XCLAIM and
#: XAUTOCLAIM do not report delivery counts.
_WITH_COUNTS = """
local function counts_of(stream, group, entries)
  local counts = {}
  for i, e in ipairs(entries) do
    if e and e[2] then
      local p = call('XPENDING', stream, group, e[1], e[1], 1)
      if #p == 1 then counts[#counts + 1] = e[1]; counts[#counts + 1] = p[1][4] end
    end
  end
  return counts
end
"""

#: Remove a consumer from a group only if it owns no pending entry (DELCONSUMER would
#: otherwise throw its entries away). KEYS[1] stream, KEYS[2] heartbeats; ARGV group, consumer.
#: Returns 1 removed, 0 kept because it owns entries, -1 no such group.
REMOVE_IF_IDLE = """
local ok, owned = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return -1 end
if #owned > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
if KEYS[2] then redis.pcall('HDEL', KEYS[2], ARGV[2]) end
return 1
"""

#: Move one entry to the dead-letter stream and ack it, only while this consumer owns it.
#: KEYS[1] stream, KEYS[2] dead-letter stream; ARGV group, consumer, id, deliveries, error,
#: then the entry's fields flat (at most ``MAX_INLINE_FIELDS``; larger entries come packed into
#: one field). Returns 1 moved, 0 not ours any more (acked or claimed).
_ADD_DEAD_LETTER = """
local args = {KEYS[2], '*'}
for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
local prov = {'conveyor.origin_stream', KEYS[1], 'conveyor.origin_id', ARGV[3],
  'conveyor.group', ARGV[1], 'conveyor.consumer', ARGV[2], 'conveyor.deliveries', ARGV[4],
  'conveyor.error', ARGV[5], 'conveyor.time', ms_text(now_ms())}
for i = 1, #prov do args[#args + 1] = prov[i] end
call('XADD', unpack(args))
"""

DEAD_LETTER = (
    _NOW_MS
    + """
local p = call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
"""
    + _ADD_DEAD_LETTER
    + """
call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
)

#: ``DEAD_LETTER`` for an entry that is nobody's pending entry: read by a ``noack`` consumer
#: (XREADGROUP NOACK), so there is nothing to check or ack. Same keys and arguments.
#: Returns 1 (added).
DEAD_LETTER_UNHELD = _NOW_MS + _ADD_DEAD_LETTER + "\nreturn 1\n"

#: Renew the lease of the entries a consumer is working on, so a long handler is not robbed
#: (XCLAIM to itself resets their idle time), then record that it is alive. Entries another
#: consumer owns now are not touched and are reported as lost. The lease comes first and the
#: beat may be refused (out of memory, a key of the wrong type) without failing the renewal:
#: a consumer whose beat is refused keeps its entries, because reclaimers take a silent
#: consumer's entries only once they are idle too.
#: KEYS[1] stream, KEYS[2] heartbeats; ARGV group, consumer, heartbeats ttl ms, this
#: consumer's heartbeat timeout ms, 1 to record the beat (0: renew only), ids...
#: Returns {ids another consumer owns now, the error that refused the beat or ''}.
HEARTBEAT = (
    _NOW_MS
    + """
local mine, lost = owned(6)
chunks(mine, function(part)
  -- unpack() expands to every id only as the last argument: JUSTID goes into the table
  part[#part + 1] = 'JUSTID'
  call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(part))
end)
local refused = ''
if ARGV[5] == '1' then
  local r = redis.pcall('HSET', KEYS[2], ARGV[2], ms_text(now_ms()) .. ':' .. ARGV[4])
  if type(r) == 'table' and r.err then
    refused = r.err
  else
    redis.pcall('PEXPIRE', KEYS[2], ARGV[3])
  end
end
return {lost, refused}
"""
)

#: Reclaim, in one step so two reclaimers never take the same entry and a batch never overfills:
#: first the entries of consumers whose heartbeat is older than their timeout and that have
#: been idle that long too (a consumer whose beats were refused still renews its leases, so it
#: is not robbed; such a consumer is removed once it owns nothing), then entries idle for at
#: least min-idle ms from anyone (XAUTOCLAIM from the caller's cursor: consumers without
#: heartbeats, or with garbage in theirs, are judged by idle time alone). Claiming adds one
#: delivery and returns fields.
#: KEYS[1] stream, KEYS[2] heartbeats; ARGV group, consumer, default heartbeat timeout ms
#: (for beats that carry none), min idle ms, cursor, count.
#: Returns {cursor, entries, deleted ids, counts, removed consumers, heartbeats error or ''};
#: deleted ids are entries the server dropped from the pending list because they were deleted
#: (Redis 7+; on 6.2 they come back as entries without fields).
RECLAIM = (
    _NOW_MS
    + BEAT_OF
    + _WITH_COUNTS
    + """
local group, me = ARGV[1], ARGV[2]
local room = tonumber(ARGV[6])
local now = now_ms()
local beats, beats_error = redis.pcall('HGETALL', KEYS[2]), ''
if beats.err then beats_error = beats.err; beats = {} end
local entries, removed = {}, {}
for i = 1, #beats, 2 do
  local name = beats[i]
  local beat, timeout = beat_of(beats[i + 1], ARGV[3])
  if name ~= me and beat and timeout and now - beat > timeout then
    if room > 0 then
      local owned = call('XPENDING', KEYS[1], group, 'IDLE', timeout, '-', '+', room, name)
      local ids = {}
      for j, row in ipairs(owned) do ids[#ids + 1] = row[1] end
      chunks(ids, function(part)
        local got = call('XCLAIM', KEYS[1], group, me, timeout, unpack(part))
        for j, e in ipairs(got) do entries[#entries + 1] = e end
      end)
      room = room - #ids
    end
    local left = call('XPENDING', KEYS[1], group, '-', '+', 1, name)
    if #left == 0 then
      call('XGROUP', 'DELCONSUMER', KEYS[1], group, name)
      redis.pcall('HDEL', KEYS[2], name)
      removed[#removed + 1] = name
    end
  end
end
local cursor, deleted = ARGV[5], {}
if room > 0 then
  local r = call('XAUTOCLAIM', KEYS[1], group, me, ARGV[4], cursor, 'COUNT', room)
  cursor = r[1]
  for j, e in ipairs(r[2]) do entries[#entries + 1] = e end
  deleted = r[3] or {}
end
return {cursor, entries, deleted, counts_of(KEYS[1], group, entries), removed, beats_error}
"""
)

#: Take back this consumer's own failed entries whose retry is due: XCLAIM (one delivery
#: more, fields returned) only those it still owns. KEYS[1] stream; ARGV group, consumer,
#: ids... Returns {entries, counts}.
TAKE_BACK = (
    _CALL
    + _WITH_COUNTS
    + """
local mine = owned(3)
local got = {}
chunks(mine, function(part)
  for j, e in ipairs(call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(part))) do
    got[#got + 1] = e
  end
end)
return {got, counts_of(KEYS[1], ARGV[1], got)}
"""
)

#: Read this consumer's own pending entries again after a lost reply, WITHOUT adding a
#: delivery (XREADGROUP by id would add one per re-read, so lost replies would push messages no
#: handler saw towards the dead-letter stream). Their leases are renewed (XCLAIM JUSTID).
#: KEYS[1] stream; ARGV group, consumer, start ('-' or '(<id>'), count.
#: Returns {entries ({id, false} for an entry deleted while pending), counts, rows read}.
REREAD = (
    _CALL
    + """
local rows = call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', tonumber(ARGV[4]), ARGV[2])
local entries, counts, ids = {}, {}, {}
for i, row in ipairs(rows) do
  local e = call('XRANGE', KEYS[1], row[1], row[1])
  if #e == 1 then entries[#entries + 1] = e[1] else entries[#entries + 1] = {row[1], false} end
  counts[#counts + 1] = row[1]
  counts[#counts + 1] = row[4]
  ids[#ids + 1] = row[1]
end
chunks(ids, function(part)
  part[#part + 1] = 'JUSTID'
  call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(part))
end)
return {entries, counts, #rows}
"""
)

#: Acknowledge entries only where this consumer still owns them: the acks of a handler that
#: ran past ``handler_timeout_ms``, whose batch other consumers may have taken meanwhile.
#: KEYS[1] stream; ARGV group, consumer, ids... Returns how many were acknowledged.
ACK_IF_MINE = (
    _CALL
    + """
local mine = owned(3)
local n = 0
chunks(mine, function(part) n = n + call('XACK', KEYS[1], ARGV[1], unpack(part)) end)
return n
"""
)

#: Give up entries at once: make them look idle for ``idle`` ms (XCLAIM to itself with IDLE,
#: no delivery added), so other consumers' reclaim takes them now. Only entries this consumer
#: still owns. KEYS[1] stream; ARGV group, consumer, idle ms, ids... Returns how many.
GIVE_UP = (
    _CALL
    + """
local mine = owned(4)
chunks(mine, function(part)
  part[#part + 1] = 'IDLE'
  part[#part + 1] = ARGV[3]
  part[#part + 1] = 'JUSTID'
  call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(part))
end)
return #mine
"""
)

#: Give back entries delivered to this consumer that no handler saw (read ahead, or carried
#: to a next batch, when it closes): idle at once, so other consumers' reclaim takes them now,
#: and their delivery count set back to what it was before that delivery (RETRYCOUNT), so the
#: reclaim that takes them counts it once. Only entries this consumer still owns.
#: KEYS[1] stream; ARGV group, consumer, idle ms, then (id, delivery count) pairs.
#: Returns how many.
GIVE_BACK = (
    _CALL
    + """
local n = 0
for i = 4, #ARGV, 2 do
  local p = call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
      'IDLE', ARGV[3], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    n = n + 1
  end
end
return n
"""
)

#: Create the group (MKSTREAM). If the server refuses (out of memory, ACL) but the group
#: exists, the consumer can start all the same. KEYS[1] stream; ARGV group, start id.
#: Returns 'created', 'exists', or 'refused: <error>' when refused although the group exists.
CREATE_GROUP = (
    _CALL
    + """
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
if type(r) == 'table' and r.err then
  if string.sub(r.err, 1, 9) == 'BUSYGROUP' then return 'exists' end
  local found = redis.pcall('XINFO', 'GROUPS', KEYS[1])
  if type(found) == 'table' and not found.err then
    for i, g in ipairs(found) do
      for j = 1, #g, 2 do
        if g[j] == 'name' and g[j + 1] == ARGV[1] then return 'refused: ' .. r.err end
      end
    end
  end
  call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2], 'MKSTREAM')
end
return 'created'
"""
)

#: Refuse, before anything is written, a target that cannot take an XADD: a key of another
#: type, or one this user may not write (``redis.acl_check_cmd``, Redis 7+). A script stops at
#: its first error without undoing what it did, so what could fail must fail first.
_CHECK_TARGETS = """
local function check_targets(first)
  for i = first, #KEYS do
    local t = redis.pcall('TYPE', KEYS[i])
    local kind = type(t) == 'table' and t.ok or nil
    if kind and kind ~= 'stream' and kind ~= 'none' then
      return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. kind
        .. ', not a stream (in XADD)')
    end
    if redis.acl_check_cmd and not redis.acl_check_cmd('XADD', KEYS[i], '*', 'f', 'v') then
      return redis.error_reply('NOPERM this user has no permissions to run the XADD command '
        .. 'on ' .. KEYS[i])
    end
  end
  return nil
end
"""

#: Forward messages: acknowledge each and add its outputs to the target streams, the outputs
#: only if this XACK removed the entry from the group's pending list. Whoever finishes a
#: message first (its consumer, or one that reclaimed it after a crash) forwards it; a second
#: finisher's XACK removes nothing and adds nothing. Nothing can fail after the first XACK:
#: targets are checked first, and a script that has written is not refused for memory.
#: KEYS[1] stream, KEYS[2..] target streams; ARGV group, then per message: id, number of
#: outputs, and per output: target's index in KEYS, number of values, field/value pairs.
#: Returns per message the ids added (none: it was no longer pending).
FORWARD = (
    _CALL
    + _CHECK_TARGETS
    + """
local refused = check_targets(2)
if refused then return refused end
local argv, last, stream, group = ARGV, #ARGV, KEYS[1], ARGV[1]
local out, n = {}, 0
local i = 2
while i <= last do
  local id, outputs = argv[i], tonumber(argv[i + 1])
  i = i + 2
  local removed = call('XACK', stream, group, id)
  local added = {}
  for k = 1, outputs do
    local width = tonumber(argv[i + 1])
    if removed == 1 then
      added[k] = call('XADD', KEYS[tonumber(argv[i])], '*', unpack(argv, i + 2, i + 1 + width))
    end
    i = i + 2 + width
  end
  n = n + 1
  out[n] = added
end
return out
"""
)

#: Add entries unless their idempotency key was seen within the window: a key names the first
#: entry added under it (a string key in the stream's slot, expiring after the window), and a
#: repeated key adds nothing and answers the first id. Every key is read before anything is
#: written, so a key of another type refuses the whole call, not half of it.
#: KEYS[1] stream, KEYS[2..] one idempotency key per entry; ARGV window ms, number of XADD
#: options (MAXLEN/MINID), the options, then per entry: number of values, field/value pairs.
#: Returns {ids, 1 per entry added and 0 per repeat}.
IDEMPOTENT_ADD = (
    _CALL
    + """
for k = 2, #KEYS do call('GET', KEYS[k]) end
local options = tonumber(ARGV[2])
local ids, fresh = {}, {}
local i = 3 + options
for k = 2, #KEYS do
  local width = tonumber(ARGV[i])
  local first = call('GET', KEYS[k])
  if first then
    ids[#ids + 1] = first
    fresh[#fresh + 1] = 0
  else
    local args = {KEYS[1]}
    for j = 3, 2 + options do args[#args + 1] = ARGV[j] end
    args[#args + 1] = '*'
    for j = i + 1, i + width do args[#args + 1] = ARGV[j] end
    local id = call('XADD', unpack(args))
    call('SET', KEYS[k], id, 'PX', ARGV[1])
    ids[#ids + 1] = id
    fresh[#fresh + 1] = 1
  end
  i = i + 1 + width
end
return {ids, fresh}
"""
)
