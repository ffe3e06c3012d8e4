"""Safe retention: trim a stream of the entries every group is done with, and nothing else.

``safe_trim`` (and ``async_safe_trim`` for asyncio clients) removes, with ``XTRIM MINID``, only
entries that every consumer group has both delivered and acked. The cut is the smallest, over
the groups, of the group's oldest pending id and the id right after its last delivered one:
an entry below it was delivered to every group (its id is at most each group's last delivered
id; for a group created at ``$``, an entry it skipped) and is pending in none (it is below
each group's oldest pending id). A pending or undelivered entry is never removed. A stream
without groups is left alone: nothing says which of its entries were processed.

The cut is computed and applied in one Lua script, so nothing happens in between: no group
can be created, read or ack meanwhile. A group created after the trim starts from what is
left (at ``0``: the first entry still there); one created with an explicit older id, or moved
back with XGROUP SETID, cannot get trimmed entries back, which is what retention means. Only
the dry run computes the cut without trimming; the count it reports is taken a moment later,
so under load it is an approximation of what a real run would remove then (a real run
recomputes the cut).

The script touches only the stream's key, so it also runs on a Redis Cluster node.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._io import Plan, server_error
from conveyor.config import check_name
from conveyor.errors import ConfigError
from conveyor.models import TrimReport

__all__ = ["DRY_RUN_COUNT_LIMIT", "SAFE_TRIM", "TrimReport", "async_safe_trim", "safe_trim"]

log = logging.getLogger("conveyor.retention")

#: a dry run counts at most this many entries below the cut (then ``at_least`` is True)
DRY_RUN_COUNT_LIMIT = 1_000_000
#: entries per XRANGE page while a dry run counts
PAGE_SIZE = 1_000


#: Compute the cut over every group and, unless ARGV[1] is '1' (dry run), trim below it.
#: Ids are compared as decimal strings (their parts may exceed a Lua number's exact range).
#: KEYS[1] stream. Returns {status, length before, cut, group, why, trimmed, length after,
#: first id, last id, groups}; status 'missing' (no such key), 'nogroups' or 'ok'; why
#: 'pending' (the group's oldest pending entry) or 'delivered' (after its last delivered one).
SAFE_TRIM = """
local function split(id)
  local dash = string.find(id, '-', 1, true)
  return string.sub(id, 1, dash - 1), string.sub(id, dash + 1)
end
local function num_less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  if am ~= bm then return num_less(am, bm) end
  return num_less(as, bs)
end
local function incr(n)
  local i = #n
  while i > 0 and string.sub(n, i, i) == '9' do i = i - 1 end
  local tail = string.rep('0', #n - i)
  if i == 0 then return '1' .. tail end
  return string.sub(n, 1, i - 1) .. string.char(string.byte(n, i) + 1) .. tail
end
local MAX = '18446744073709551615'
local function after(id)
  local ms, seq = split(id)
  if seq ~= MAX then return ms .. '-' .. incr(seq) end
  if ms ~= MAX then return incr(ms) .. '-0' end
  return id
end
local function edge(entries)
  if #entries == 0 then return '' end
  return entries[1][1]
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', 0, '', '', '', 0, 0, '', '', 0} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local length = redis.call('XLEN', KEYS[1])
local first = edge(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1))
local last = edge(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1))
if #groups == 0 then return {'nogroups', length, '', '', '', 0, length, first, last, 0} end
local cut, holder, why = nil, '', ''
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local c, w = after(info['last-delivered-id']), 'delivered'
  if tonumber(info['pending']) > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], info['name'])[2]
    if oldest and id_less(oldest, c) then c, w = oldest, 'pending' end
  end
  if cut == nil or id_less(c, cut) then cut, holder, why = c, info['name'], w end
end
local trimmed = 0
if ARGV[1] ~= '1' then trimmed = redis.call('XTRIM', KEYS[1], 'MINID', '=', cut) end
local left = redis.call('XLEN', KEYS[1])
return {'ok', length, cut, holder, why, trimmed, left, first, last, #groups}
"""


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _trim_plan(stream: str, dry_run: bool) -> Plan[TrimReport]:
    check_name("stream", stream)
    if not isinstance(dry_run, bool):
        raise ConfigError(f"dry_run must be True or False, got {dry_run!r}")
    replies = yield [("EVAL", SAFE_TRIM, 1, stream, "1" if dry_run else "0")]
    reply = replies[0]
    if isinstance(reply, ResponseError):
        raise server_error(reply, f"safe trim of stream {stream!r}")
    status, cut, holder, why, first, last = (cmd.as_text(reply[i]) for i in (0, 2, 3, 4, 7, 8))
    length, trimmed, after, groups = (int(reply[i]) for i in (1, 5, 6, 9))
    if status == "missing":
        return TrimReport(stream, 0, None, 0, 0, 0, None, "no such stream", dry_run)
    if status == "nogroups":
        reason = "no consumer groups: not trimmed (nothing says which entries were processed)"
        return TrimReport(stream, 0, None, length, length, 0, None, reason, dry_run)
    if why == "pending":
        reason = f"cut at {cut}: the oldest pending entry of group {holder!r}"
    else:
        reason = f"cut at {cut}: right after the last entry delivered to group {holder!r}"
    at_least = False
    if dry_run:
        trimmed, at_least = yield from _count_below(stream, cut, length, first, last)
        after = length - trimmed
    report = TrimReport(
        stream, trimmed, cut, length, after, groups, holder, reason, dry_run, at_least
    )
    log.info("%s", report)
    return report


def _count_below(
    stream: str, cut: str, length: int, first: str, last: str
) -> Plan[tuple[int, bool]]:
    """How many entries have ids below ``cut``: exact where the cut lies outside the
    stream's range, else counted a page at a time, up to DRY_RUN_COUNT_LIMIT."""
    if length == 0 or _id_key(cut) <= _id_key(first):
        return 0, False
    if _id_key(cut) > _id_key(last):
        return length, False
    counted, start = 0, "-"
    while counted < DRY_RUN_COUNT_LIMIT:
        page = min(PAGE_SIZE, DRY_RUN_COUNT_LIMIT - counted)
        replies = yield [("XRANGE", stream, start, "(" + cut, "COUNT", page)]
        if isinstance(replies[0], ResponseError):
            raise server_error(replies[0], f"XRANGE on stream {stream!r}")
        entries: list[Any] = replies[0] or []
        counted += len(entries)
        if len(entries) < page:
            return counted, False
        start = "(" + cmd.as_text(entries[-1][0])
    return counted, True


def safe_trim(client: Any, stream: str, *, dry_run: bool = False) -> TrimReport:
    """Remove the entries of ``stream`` that every consumer group has delivered and acked.

    Returns a TrimReport: how many entries went (with ``dry_run``: would go, nothing changes),
    the cut and the group that held it back, or why nothing was trimmed (no such stream, no
    groups). Exact trimming (``MINID =``) takes time in proportion to what it removes: run it
    often rather than rarely on a busy stream.

    >>> report = safe_trim(r, "orders", dry_run=True)      # doctest: +SKIP
    >>> print(report)                                      # doctest: +SKIP
    orders: would trim 9000 of 9500; cut at 1700000000123-0: the oldest pending entry of ...
    """
    _io.check_client(client, asyncio=False, owner="safe_trim", twin="await async_safe_trim")
    return _io.run_plan(client, _trim_plan(stream, dry_run))


async def async_safe_trim(client: Any, stream: str, *, dry_run: bool = False) -> TrimReport:
    """``safe_trim`` for a ``redis.asyncio`` client.

    >>> report = await async_safe_trim(ar, "orders")       # doctest: +SKIP
    """
    _io.check_client(client, asyncio=True, owner="async_safe_trim", twin="safe_trim")
    return await _io.arun_plan(client, _trim_plan(stream, dry_run))
