"""Lua for the monitor's steps that must be atomic on the server.

Like ``scripts``, each touches only the stream and keys derived from it (one hash slot), reads
time from the server's clock, and checks who owns an entry inside the script.
"""

from __future__ import annotations

from conveyor._core.scripts import BEAT_OF

__all__ = ["COUNT_AFTER", "MOVE_DEAD_ENTRIES"]

#: Hand the pending entries of a dead consumer to a live one of the same group, checking in the
#: same step that the first is still dead and the second still alive (by their heartbeats), and
#: taking only entries the dead one owns at that moment. XCLAIM JUSTID counts no delivery, and
#: IDLE keeps each entry's idle time, so consumers reclaim the moved entries as soon as they
#: would have reclaimed them from the dead one.
#: KEYS[1] stream, KEYS[2] heartbeats; ARGV group, dead consumer, live consumer, default
#: heartbeat timeout ms (for beats that carry none), count. Returns {code, moved ids, dropped
#: ids}. Codes: 1 done; 0 the dead one is not dead any more (it beat again); -1 the live one is
#: not alive any more; -2 no such group. Dropped ids were deleted or trimmed from the stream: the
#: server drops them from the pending list instead of moving them.
MOVE_DEAD_ENTRIES = (
    BEAT_OF
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead_beat, dead_timeout = beat_of(redis.call('HGET', KEYS[2], ARGV[2]), ARGV[4])
if not dead_beat or now - dead_beat <= dead_timeout then return {0, {}, {}} end
local live_beat, live_timeout = beat_of(redis.call('HGET', KEYS[2], ARGV[3]), ARGV[4])
if not live_beat or now - live_beat > live_timeout then return {-1, {}, {}} end
local ok, owned = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[5], ARGV[2])
if not ok then return {-2, {}, {}} end
local moved, dropped = {}, {}
for i, row in ipairs(owned) do
  local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, row[1], 'IDLE', row[3], 'JUSTID')
  if #got == 1 then moved[#moved + 1] = row[1] else dropped[#dropped + 1] = row[1] end
end
return {1, moved, dropped}
"""
)

#: How many entries come after an id, up to a bound: a group's lag when the server cannot tell.
#: Counted on the server so the entries do not cross the network. KEYS[1] stream; ARGV after
#: id (exclusive), bound.
COUNT_AFTER = """
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
"""
