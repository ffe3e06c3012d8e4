"""Lua for the steps that must be atomic on the server.

Each script touches only keys in one hash slot (the stream and keys derived from it), so it
also runs on a Redis Cluster.
"""

from __future__ import annotations

__all__ = ["REMOVE_IF_IDLE"]

#: Remove a consumer from a group only if it owns no pending entry (DELCONSUMER would
#: otherwise throw its entries away). KEYS[1] stream; ARGV group, consumer.
#: Returns 1 removed, 0 kept because it owns entries, -1 no such group.
REMOVE_IF_IDLE = """
local ok, owned = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return -1 end
if #owned > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
