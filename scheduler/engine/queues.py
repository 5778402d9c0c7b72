"""The engine's waiting rooms: which queued run may start now, without scanning everything.

* A run whose VM is busy (one action runs at a time per VM) waits in that VM's room.
* A ready non-backup run starts at once: backup limits do not apply to it.
* A ready backup waits in its host's heap, earliest due first. The dispatcher looks only at the head
  of each host that has room, so a saturated host costs nothing and blocks nobody else (no
  head-of-line blocking); a head held back by its datastore's limit lets the next one on that host
  be considered.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterator

from scheduler.engine.admission import Candidate, Limits, Running, blocking_reason
from scheduler.engine.journal import Run

Order = tuple[float, int, int]


def order(run: Run) -> Order:
    return (float(run.scheduled), -run.priority, run.id)


class Queues:
    def __init__(self, is_backup: Callable[[Run], bool]) -> None:
        self.is_backup = is_backup
        self.by_vm: dict[int, list[tuple[Order, Run]]] = defaultdict(list)  # runs of busy VMs
        self.ready: list[tuple[Order, Run]] = []  # non-backup runs whose VM is free
        self.by_host: dict[int, list[tuple[Order, Run]]] = defaultdict(list)  # backups whose VM is free
        self.busy_vms: set[int] = set()
        self.queued: dict[int, Run] = {}
        self.of_vm: dict[int, set[int]] = defaultdict(set)  # queued run ids per VM
        self.held = False  # some host is in ERROR/DISABLED/OFFLINE: candidates must be checked

    def __len__(self) -> int:
        return len(self.queued)

    def add(self, run: Run) -> None:
        self.queued[run.id] = run
        self.of_vm[run.vm_id].add(run.id)
        self._place(run)

    def remove(self, run_id: int) -> Run | None:
        """Forget a queued run (cancelled, its action deleted); its heap entries are skipped later."""
        run = self.queued.pop(run_id, None)
        if run is not None:
            self._forget(run)
        return run

    def _forget(self, run: Run) -> None:
        ids = self.of_vm.get(run.vm_id)
        if ids is not None:
            ids.discard(run.id)
            if not ids:
                del self.of_vm[run.vm_id]

    def _place(self, run: Run) -> None:
        entry = (order(run), run)
        if run.vm_id in self.busy_vms:
            heapq.heappush(self.by_vm[run.vm_id], entry)
        elif self.is_backup(run):
            heapq.heappush(self.by_host[run.host_id], entry)
        else:
            heapq.heappush(self.ready, entry)

    def vm_started(self, vm_id: int) -> None:
        self.busy_vms.add(vm_id)

    def vm_finished(self, vm_id: int) -> None:
        self.busy_vms.discard(vm_id)
        for _, run in self.by_vm.pop(vm_id, []):
            if run.id in self.queued:
                self._place(run)

    def _live(self, entry: tuple[Order, Run]) -> bool:
        return self.queued.get(entry[1].id) is entry[1]

    def next_others(self) -> Iterator[Run]:
        """Ready non-backup runs, earliest first; each yielded run is taken out of the queue."""
        while self.ready:
            entry = heapq.heappop(self.ready)
            run = entry[1]
            if not self._live(entry):
                continue
            if run.vm_id in self.busy_vms:
                heapq.heappush(self.by_vm[run.vm_id], entry)
                continue
            del self.queued[run.id]
            self._forget(run)
            yield run

    def next_backups(self, running: Running, limits: Limits, candidate: Callable[[Run], Candidate]) -> list[Run]:
        """Backups admitted now, earliest due first across hosts; taken out of the queue.

        One pass keeps a heap of the hosts' heads. A host found full or held is dropped for the rest
        of the pass (admitting more can only fill things further), so a pass costs
        O(hosts + admitted x log hosts).
        """
        admitted: list[Run] = []
        if not self.by_host or (limits.max_backups and running.total >= limits.max_backups):
            return admitted
        counts = running.copy()
        heads: list[tuple[Order, int]] = []
        for host_id in list(self.by_host):
            if limits.max_backups_host and counts.per_host[host_id] >= limits.max_backups_host:
                continue
            head = self._head(host_id)
            if head is not None:
                heads.append((head[0], host_id))
        heapq.heapify(heads)
        while heads and not (limits.max_backups and counts.total >= limits.max_backups):
            _, host_id = heapq.heappop(heads)
            if limits.max_backups_host and counts.per_host[host_id] >= limits.max_backups_host:
                continue
            heap = self.by_host[host_id]
            index = self._first_admissible(heap, counts, limits, candidate)
            if index is None:
                continue
            run = self._take(heap, index)
            admitted.append(run)
            counts.add(run.host_id, run.datastore_id)
            head = self._head(host_id)
            if head is not None:
                heapq.heappush(heads, (head[0], host_id))
        return admitted

    def _head(self, host_id: int) -> tuple[Order, Run] | None:
        """The host's earliest live backup whose VM is free (others move to their VM's room)."""
        heap = self.by_host.get(host_id)
        while heap and (not self._live(heap[0]) or heap[0][1].vm_id in self.busy_vms):
            entry = heapq.heappop(heap)
            if self._live(entry):
                heapq.heappush(self.by_vm[entry[1].vm_id], entry)
        if not heap:
            self.by_host.pop(host_id, None)
            return None
        return heap[0]

    def _take(self, heap: list[tuple[Order, Run]], index: int) -> Run:
        entry = heap[index]
        if index == 0:
            heapq.heappop(heap)
        else:
            heap[index] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
        run = entry[1]
        del self.queued[run.id]
        self._forget(run)
        self.busy_vms.add(run.vm_id)
        return run

    def _first_admissible(self, heap: list[tuple[Order, Run]], counts: Running, limits: Limits,
                          candidate: Callable[[Run], Candidate]) -> int | None:
        """The head, or when only its datastore holds it, the earliest entry whose datastore has room."""
        if not (limits.max_backups_datastore or limits.max_backups_host or limits.max_backups) and not self.held:
            return 0
        head = heap[0][1]
        reason = blocking_reason(candidate(head), counts, limits)
        if reason is None:
            return 0
        if "MAX_BACKUPS_DATASTORE" not in reason:
            return None  # the whole host is held (its state or its limit)
        for index in sorted(range(1, len(heap)), key=lambda i: heap[i][0]):
            entry = heap[index]
            if self._live(entry) and entry[1].vm_id not in self.busy_vms:
                if blocking_reason(candidate(entry[1]), counts, limits) is None:
                    return index
        return None
