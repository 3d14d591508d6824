"""The one map-diff engine: a BPF map's entries as the exact bytes the kernel holds, mirrored in memory,
so that a sync writes only the keys whose bytes differ and deletes only the keys nobody wants. Every map
bpflb programs (lbmaps, clustermaps) goes through it; callers choose the order of the phases."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from bpflb.datapath.loader import Map


class MapMirror:
    """One map and its entries as last written or read (recovered from the map itself: pins survive)."""

    def __init__(self, m: Map, *, batch: bool = True) -> None:
        self.map = m
        self.batch = batch          # one bpf_map_*_batch syscall per phase; False for maps without batch ops
        self.entries: dict[bytes, bytes] = dict(m.items_raw())

    def changed(self, want: Mapping[bytes, bytes], keys: Iterable[bytes] | None = None) -> list[tuple[bytes, bytes]]:
        """The (key, value) pairs of want (only keys, when given) that the map does not hold as they are."""
        have = self.entries
        if keys is None:
            return [(k, v) for k, v in want.items() if have.get(k) != v]
        return [(k, want[k]) for k in keys if have.get(k) != want[k]]

    def stale(self, want: Mapping[bytes, bytes] | set[bytes]) -> list[bytes]:
        """The keys the map holds that want does not."""
        return [k for k in self.entries if k not in want]

    def write(self, items: list[tuple[bytes, bytes]]) -> int:
        """Write the pairs (the mirror follows only what the kernel accepted); return how many."""
        if self.batch:
            self.map.update_many(items)
            self.entries.update(items)
        else:
            for k, v in items:
                self.map.update_raw(k, v)
                self.entries[k] = v
        return len(items)

    def remove(self, keys: list[bytes]) -> int:
        """Delete the keys (missing ones are no error); return how many."""
        if self.batch:
            self.map.delete_many(keys)
        else:
            for k in keys:
                self.map.delete_raw(k)
        for k in keys:
            self.entries.pop(k, None)
        return len(keys)

    def sync(self, want: Mapping[bytes, bytes]) -> int:
        """Make the map hold exactly want: changed keys first, then stale ones; return keys touched."""
        return self.write(self.changed(want)) + self.remove(self.stale(want))
