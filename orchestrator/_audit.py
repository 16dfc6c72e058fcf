"""The audit chain over a run's history: each entry carries an HMAC chaining it to the one
before, keyed with `ORCHESTRATOR_AUDIT_KEY`.

    mac(n) = HMAC-SHA256(key, mac(n-1) "\\n" run_id "\\n" canonical(entry n without mac))

with mac(-1) = "" and canonical = JSON with sorted keys and no spaces. The entry's `n` (its
position in the run's history) is part of what is MACed, so an entry edited, deleted,
inserted, duplicated or moved no longer matches; the run id is too, so an entry copied
from another run does not either. Redis never sees the key: the store seals the entries
it appends in Python, for the positions the run's history is at, and the script that
appends them refuses (nothing written; the store seals again and retries) if another
append came first (see `RedisStore`).

Trimming: a history keeps its first and last `history_limit` entries. Entries in the tail
(`n >= history_limit`) also carry `prev`, the mac of the entry before them, inside what is
MACed, so the oldest entry kept in the tail, whose predecessor was dropped, can still be
checked and anchors the rest. The entries dropped in the middle are gone: what is checked is
that the kept ones are unaltered and in their places.

What it does not protect: someone who has the key and write access to Redis can rewrite
anything; dropping the newest entries while also lowering the run's entry count (`hn` in
its record) is not detected (keep the head mac `audit verify` prints somewhere else to
catch that); the run's record itself (its state, the gate's approvals) is not covered,
only its history.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

KEY_ENV = "ORCHESTRATOR_AUDIT_KEY"


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def mac(key: bytes, run_id: str, prev: str, body: dict[str, Any]) -> str:
    message = prev.encode() + b"\n" + run_id.encode() + b"\n" + canonical(body)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def seal(key: bytes, run_id: str, n: int, prev: str, limit: int,
         entry: dict[str, Any]) -> dict[str, Any]:
    """The entry as it will be stored at position `n`, after the entry whose mac is `prev`:
    with its `mac` (and `prev` in the tail). JSON round trip first, so what is MACed is
    what a reader will parse."""
    body = json.loads(json.dumps({k: v for k, v in entry.items()
                                  if k not in ("n", "mac", "prev")}))
    body["n"] = n
    if n >= limit:
        body["prev"] = prev
    return {**body, "mac": mac(key, run_id, prev, body)}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int  # entries whose mac matched
    total: int  # entries the run has appended (dropped ones included)
    first_bad: int | None = None  # the position of the first entry that does not match
    reason: str = ""
    head_mac: str = ""  # the mac of the newest entry (to keep elsewhere)
    dropped: int = 0  # entries trimmed from the middle (not checkable)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "total": self.total,
                "first_bad": self.first_bad, "reason": self.reason,
                "head_mac": self.head_mac, "dropped": self.dropped}


def verify(key: bytes, run_id: str, head: list[str], tail: list[str], total: int,
           limit: int) -> Verdict:
    """Check the stored entries of a run: `head` (positions 0..limit-1) and `tail` (the
    last `limit` after those), `total` appended so far."""
    first_tail = max(limit, total - limit)
    dropped = max(0, first_tail - limit) if total > limit else 0
    prev, checked = "", 0

    def bad(n: int, why: str) -> Verdict:
        return Verdict(False, checked, total, n, why, prev, dropped)

    expected = [(i, raw) for i, raw in enumerate(head)]
    expected += [(first_tail + j, raw) for j, raw in enumerate(tail)]
    for n, raw in expected:
        try:
            entry = json.loads(raw)
        except ValueError:
            return bad(n, f"entry {n} is not JSON")
        if not isinstance(entry, dict):
            return bad(n, f"entry {n} is not a JSON object")
        if entry.get("n") != n:
            return bad(n, f"entry {entry.get('n')!r} is where entry {n} belongs (entries "
                          f"deleted, inserted or reordered)")
        stored = entry.pop("mac", None)
        if not isinstance(stored, str):
            return bad(n, f"entry {n} carries no mac (written without {KEY_ENV}, or edited)")
        if n >= limit:
            link = entry.get("prev")
            if not isinstance(link, str):
                return bad(n, f"entry {n} carries no link to the entry before it")
            if n == first_tail and dropped:
                prev = link  # its predecessor was trimmed: the link itself is MACed
            elif link != prev:
                return bad(n, f"entry {n} does not link to entry {n - 1}")
        if not hmac.compare_digest(stored, mac(key, run_id, prev, entry)):
            return bad(n, f"entry {n} does not match its mac (edited, or another key)")
        prev, checked = stored, checked + 1
    kept = min(total, limit) + (total - first_tail if total > limit else 0)
    if len(expected) != kept:
        n = expected[-1][0] + 1 if expected else 0
        if len(head) < min(total, limit):
            n = len(head)
        return bad(n, f"{len(expected)} entries stored where {kept} belong (entries deleted "
                      f"or added)")
    return Verdict(True, checked, total, None, "", prev, dropped)
