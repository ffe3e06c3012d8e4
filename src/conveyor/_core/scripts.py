"""Lua for the steps that must be atomic on the server.

Each script touches only keys in one hash slot (the stream and keys derived from it with the same
hash tag), so it also runs on a Redis Cluster. Times come from the server's clock (``TIME``), so
consumers on hosts whose clocks disagree still agree on who is alive. Every claim checks who owns
an entry inside the script: two reclaimers can never both take it.
"""

from __future__ import annotations

from conveyor.models import PROVENANCE_FIELDS

__all__ = [
    "BEAT_OF",
    "DEAD_LETTER",
    "HEARTBEAT",
    "PROVENANCE_FIELDS",
    "RECLAIM",
    "REMOVE_IF_IDLE",
    "TAKE_BACK",
]

_NOW_MS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ms_text(ms)
  return string.format('%d', ms)
end
"""

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
      local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
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
if KEYS[2] then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
"""

#: Move one entry to the dead-letter stream and ack it, only while this consumer owns it.
#: KEYS[1] stream, KEYS[2] dead-letter stream; ARGV group, consumer, id, deliveries, error,
#: then the entry's fields flat. Returns 1 moved, 0 not ours any more (acked or claimed).
DEAD_LETTER = (
    _NOW_MS
    + """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
local args = {KEYS[2], '*'}
for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
local prov = {'conveyor.origin_stream', KEYS[1], 'conveyor.origin_id', ARGV[3],
  'conveyor.group', ARGV[1], 'conveyor.consumer', ARGV[2], 'conveyor.deliveries', ARGV[4],
  'conveyor.error', ARGV[5], 'conveyor.time', ms_text(now_ms())}
for i = 1, #prov do args[#args + 1] = prov[i] end
redis.call('XADD', unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
)

#: Record that a consumer is alive and renew the lease of the entries it is working on, so a
#: long handler is not robbed (XCLAIM to itself resets their idle time). Entries another
#: consumer owns now are not touched and are reported as lost.
#: KEYS[1] stream, KEYS[2] heartbeats; ARGV group, consumer, heartbeats ttl ms, this
#: consumer's heartbeat timeout ms, ids...
#: Returns the ids another consumer owns now (acked ones are simply skipped).
HEARTBEAT = (
    _NOW_MS
    + """
redis.call('HSET', KEYS[2], ARGV[2], ms_text(now_ms()) .. ':' .. ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local mine, lost = {}, {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 then
    if p[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
  end
end
if #mine > 0 then
  -- unpack() expands to every id only as the last argument: JUSTID goes into the table
  mine[#mine + 1] = 'JUSTID'
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return lost
"""
)

#: Reclaim, in one step so two reclaimers never take the same entry and a batch never overfills:
#: first the entries of consumers whose heartbeat is older than the timeout (at once, whatever
#: their idle time; such a consumer is removed once it owns nothing), then entries idle for at
#: least min-idle ms from anyone (XAUTOCLAIM from the caller's cursor: consumers without
#: heartbeats are judged by idle time alone). Claiming adds one delivery and returns fields.
#: KEYS[1] stream, KEYS[2] heartbeats; ARGV group, consumer, default heartbeat timeout ms
#: (for beats that carry none), min idle ms,
#: cursor, count. Returns {cursor, entries, deleted ids, counts, removed consumers}; deleted ids
#: are entries the server dropped from the pending list because they were deleted (Redis 7+;
#: on 6.2 they come back as entries without fields).
RECLAIM = (
    _NOW_MS
    + BEAT_OF
    + _WITH_COUNTS
    + """
local group, me = ARGV[1], ARGV[2]
local room = tonumber(ARGV[6])
local now = now_ms()
local beats = redis.call('HGETALL', KEYS[2])
local entries, removed = {}, {}
for i = 1, #beats, 2 do
  local name = beats[i]
  local beat, timeout = beat_of(beats[i + 1], ARGV[3])
  if name ~= me and beat and now - beat > timeout then
    if room > 0 then
      local owned = redis.call('XPENDING', KEYS[1], group, '-', '+', room, name)
      if #owned > 0 then
        local ids = {}
        for j, row in ipairs(owned) do ids[#ids + 1] = row[1] end
        local got = redis.call('XCLAIM', KEYS[1], group, me, 0, unpack(ids))
        for j, e in ipairs(got) do entries[#entries + 1] = e end
        room = room - #ids
      end
    end
    local left = redis.call('XPENDING', KEYS[1], group, '-', '+', 1, name)
    if #left == 0 then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, name)
      redis.call('HDEL', KEYS[2], name)
      removed[#removed + 1] = name
    end
  end
end
local cursor, deleted = ARGV[5], {}
if room > 0 then
  local r = redis.call('XAUTOCLAIM', KEYS[1], group, me, ARGV[4], cursor, 'COUNT', room)
  cursor = r[1]
  for j, e in ipairs(r[2]) do entries[#entries + 1] = e end
  deleted = r[3] or {}
end
return {cursor, entries, deleted, counts_of(KEYS[1], group, entries), removed}
"""
)

#: Take back this consumer's own failed entries whose retry is due: XCLAIM (one delivery
#: more, fields returned) only those it still owns. KEYS[1] stream; ARGV group, consumer,
#: ids... Returns {entries, counts}.
TAKE_BACK = (
    _WITH_COUNTS
    + """
local mine = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] end
end
if #mine == 0 then return {{}, {}} end
local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
return {got, counts_of(KEYS[1], ARGV[1], got)}
"""
)
