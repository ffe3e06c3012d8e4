"""What a consumer warns about once per server at startup, from the server's INFO: settings and
versions under which Redis Streams lose or break things. Pure: the driver sends ``INFO`` and
passes the reply's text here.

>>> startup_warnings(parse_info("redis_version:7.0.15\\r\\naof_enabled:1\\r\\n"
...                              "maxmemory_policy:noeviction\\r\\n"))
[]
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["parse_info", "startup_warnings"]

#: (first affected, first fixed, what goes wrong): Redis releases with stream bugs that bite a
#: consumer group worker (Valkey forked after these fixes)
KNOWN_BUGS: tuple[tuple[tuple[int, ...], tuple[int, ...], str], ...] = (
    (
        (0,),
        (7, 0, 0),
        "XAUTOCLAIM does not report entries deleted while pending (Redis 7.0 does), so they "
        "stay in the pending list; conveyor is tested on 7.0 and later",
    ),
    (
        (6, 2, 0),
        (6, 2, 8),
        "XAUTOCLAIM with a large COUNT can crash the server (CVE-2022-35951); upgrade to "
        "6.2.8 or later",
    ),
    (
        (7, 0, 0),
        (7, 0, 5),
        "XAUTOCLAIM can overflow the heap and with a large COUNT crash the server "
        "(CVE-2022-31144, CVE-2022-35951); upgrade to 7.0.5 or later",
    ),
)


def parse_info(text: str) -> dict[str, str]:
    """The ``field:value`` lines of an INFO reply (section headers and blanks skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
    return out


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def startup_warnings(info: Mapping[str, str]) -> list[str]:
    """One line per problem found in ``info`` (INFO's fields); nothing for a field it lacks
    (a managed service may hide some).

    >>> startup_warnings({"aof_enabled": "0", "maxmemory_policy": "allkeys-lru"})[1][:40]
    'maxmemory-policy is allkeys-lru: under m'
    """
    out = []
    if info.get("aof_enabled") == "0":
        out.append(
            "AOF is off (appendonly no): a restart or failover loses what was written since the "
            "last snapshot, new entries and acks alike (acked messages come again, added ones "
            "are gone); set appendonly yes"
        )
    policy = info.get("maxmemory_policy")
    if policy is not None and policy != "noeviction":
        out.append(
            f"maxmemory-policy is {policy}: under memory pressure the server evicts whole keys, "
            "whole streams with their groups and pending lists included; set noeviction "
            "(writes are then refused with OOM, which conveyor retries)"
        )
    if "valkey_version" not in info and info.get("server_name", "redis") == "redis":
        version = _version(info.get("redis_version", ""))
        if version:
            for first, fixed, what in KNOWN_BUGS:
                if first <= version < fixed:
                    shown = info["redis_version"]
                    out.append(f"Redis {shown}: {what}")
    return out
