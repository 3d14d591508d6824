"""The one map-diff engine: a BPF map's entries as the exact bytes the kernel holds, mirrored in memory,
so that a sync writes only the keys whose bytes differ and deletes only the keys nobody wants. Every map
bpflb programs (lbmaps, clustermaps) goes through it; callers choose the order of the phases.

The mirror never drifts from the kernel: it follows every write the kernel accepted, one by one (a batch
that stops halfway says how far it got), and is re-read from the map itself after any failure it cannot
account for. A failed key is returned with the kernel's reason, never raised: the caller decides which
object it belongs to and refuses that object alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from bpflb.datapath.libbpf import BpfError
from bpflb.datapath.loader import Map

Failures = list[tuple[bytes, str]]      # (key, the kernel's reason) of every write that did not happen


def write_each(m: Map, keys: list[bytes], values: list[bytes], held: Callable[[bytes], bytes | None],
               put: Callable[[bytes, bytes], None]) -> Failures:
    """Write the pairs one by one, skipping those a mirror (held, put) says the map holds already; the
    mirror takes each write the kernel accepted. Returns the refused ones with the kernel's reason."""
    failures: Failures = []
    for k, v in zip(keys, values, strict=True):
        if held(k) == v:
            continue
        try:
            m.update_raw(k, v)
        except BpfError as exc:
            failures.append((k, exc.strerror or str(exc)))
            continue
        put(k, v)
    return failures


def after_failed_batch(m: Map, keys: list[bytes], values: list[bytes], exc: BpfError, reload: Callable[[], None],
                       held: Callable[[bytes], bytes | None], put: Callable[[bytes, bytes], None]) -> Failures:
    """After a batch update of the pairs that stopped: the mirror takes what the kernel says it wrote (or the
    whole map again when it cannot say), then the rest goes one by one (write_each)."""
    done = getattr(exc, "done", None)
    if done is None:
        reload()                    # how far the batch got is unknown: ask the kernel
        done = 0
    for k, v in zip(keys[:done], values[:done], strict=True):
        put(k, v)
    return write_each(m, keys[done:], values[done:], held, put)


def remove_keys(m: Map, keys: list[bytes], batch: bool, reload: Callable[[], None],
                held: Callable[[bytes], bool], forget: Callable[[bytes], object]) -> Failures:
    """Delete the keys (missing ones are no error) and forget each one the kernel deleted: in one batch, or,
    when that stops (or batch is False), the kernel's truth read again (reload) and the keys still held one by
    one; return those the kernel refused."""
    if not keys:
        return []
    try:
        if batch:
            m.delete_many(keys)
            for k in keys:
                forget(k)
            return []
    except BpfError:
        reload()
    failures: Failures = []
    for k in keys:
        if not held(k):
            continue
        try:
            m.delete_raw(k)
        except BpfError as exc:
            failures.append((k, exc.strerror or str(exc)))
            continue
        forget(k)
    return failures


class MapMirror:
    """One map and its entries as last written or read (recovered from the map itself: pins survive)."""

    def __init__(self, m: Map, *, batch: bool = True) -> None:
        self.map = m
        self.batch = batch          # one bpf_map_*_batch syscall per phase; False for maps without batch ops
        self.entries: dict[bytes, bytes] = dict(m.items_raw())
        self.reloads = 0            # how often the kernel's truth had to be re-read (after a failure)

    @property
    def capacity(self) -> int:
        """The map's max_entries (0 when unknown)."""
        return self.map.max_entries

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def reload(self) -> None:
        """Read the map's entries from the kernel again: the truth after a write whose outcome is unknown."""
        self.entries.clear()
        self.entries.update(self.map.items_raw())
        self.reloads += 1

    def changed(self, want: Mapping[bytes, bytes], keys: Iterable[bytes] | None = None) -> list[tuple[bytes, bytes]]:
        """The (key, value) pairs of want (only keys, when given) that the map does not hold as they are."""
        have = self.entries
        if keys is None:
            return [(k, v) for k, v in want.items() if have.get(k) != v]
        return [(k, want[k]) for k in keys if have.get(k) != want[k]]

    def stale(self, want: Mapping[bytes, bytes] | set[bytes]) -> list[bytes]:
        """The keys the map holds that want does not."""
        return [k for k in self.entries if k not in want]

    def write(self, items: list[tuple[bytes, bytes]]) -> Failures:
        """Write the pairs; return those the kernel refused, with its reason. The mirror holds exactly what
        the kernel accepted."""
        return self.write_columns([k for k, _ in items], [v for _, v in items])

    def write_columns(self, keys: list[bytes], values: list[bytes]) -> Failures:
        """write() of keys[i] -> values[i]: a large sync's writes without a pair object for each."""
        if not keys:
            return []
        if not self.batch:
            return write_each(self.map, keys, values, self.entries.get, self.entries.__setitem__)
        try:
            self.map.update_columns(keys, values)
        except BpfError as exc:
            return after_failed_batch(self.map, keys, values, exc, self.reload, self.entries.get,
                                      self.entries.__setitem__)
        self.entries.update(zip(keys, values))
        return []

    def remove(self, keys: list[bytes]) -> Failures:
        """Delete the keys (missing ones are no error); return those the kernel refused to delete."""
        entries = self.entries
        return remove_keys(self.map, keys, self.batch, self.reload, entries.__contains__,
                           lambda k: entries.pop(k, None))

    def sync(self, want: Mapping[bytes, bytes]) -> tuple[int, Failures]:
        """Make the map hold exactly want: stale keys first (room before anything is added), then changed
        ones; return (keys touched, the writes refused)."""
        stale = self.stale(want)
        failures = self.remove(stale)
        changed = self.changed(want)
        failures += self.write(changed)
        return len(stale) + len(changed) - len(failures), failures
