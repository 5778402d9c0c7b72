"""The engine: runs scheduled actions on time, within the backup limits, and survives crashes.

Event-driven: a heap of due times; the loop sleeps until the earliest one or until something changes
(an API call, a finished run, a reload). Each execution is a journal row written before any side
effect. One action runs at a time per VM; backups additionally pass admission (MAX_BACKUPS,
MAX_BACKUPS_HOST, MAX_BACKUPS_DATASTORE). A failed backup is retried with exponential backoff up to
RETRY/MAX times, then given up (recorded and visible) and the action moves on; other actions run at
most once. The clock is a parameter: with a virtual clock the same code simulates weeks in seconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from zoneinfo import ZoneInfo

from scheduler.engine.admission import Candidate, Limits, Running, blocking_reason
from scheduler.engine.clock import Clock
from scheduler.engine.journal import Journal, Run, RunState
from scheduler.engine.metrics import Histogram
from scheduler.engine.outcome import CANCELLED, Outcome, OutcomeKind, RetryPolicy, failed, succeeded
from scheduler.engine.queues import Queues
from scheduler.engine.sink import RunSink
from scheduler.errors import DriverError
from scheduler.logs import log_context
from scheduler.model import schedule
from scheduler.model.objects.host import ceph_hold
from scheduler.model.objects.states import HostState
from scheduler.model.schedule import SchedAction
from scheduler.store.state import Mutation, State

log = logging.getLogger(__name__)

MISSED_GRACE = 60  # seconds: an occurrence later than this when found is a missed run (MISSED_RUNS)
_HOST_HELD = {HostState.ERROR: "in ERROR", HostState.DISABLED: "DISABLED", HostState.OFFLINE: "OFFLINE",
              HostState.MONITORING_ERROR: "in ERROR"}


@dataclass(frozen=True)
class EngineSettings:
    limits: Limits = Limits()
    retry_max: int = 3
    retry_backoff: float = 60.0
    missed_runs: str = "ONCE"
    timezone: str = "UTC"
    drain_time: float = 60.0

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


# How a run is carried out: returns a message for the record, raises on failure.
# One attempt of a run, reporting through the sink; the message for the run record.
Executor = Callable[[Run, RunSink], Awaitable[str | None]]
# Undo what an interrupted run left behind (overlays, paused guests...) before it is retried.
Recoverer = Callable[[Run], Awaitable[None]]


@dataclass
class EngineStats:
    started: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    given_up: Counter[str] = field(default_factory=Counter)
    lateness_histogram: Histogram = field(default_factory=Histogram)  # seconds, dispatch minus due time
    lateness: list[float] | None = None  # every sample, when a simulation asks for percentiles
    last_success: dict[int, float] = field(default_factory=dict)  # vm id -> epoch
    max_running: int = 0
    max_running_host: int = 0
    max_running_datastore: int = 0
    limit_violations: int = 0


class Engine:
    def __init__(
        self,
        state: State,
        journal: Journal,
        clock: Clock,
        settings: EngineSettings,
        executor: Executor,
        is_backup: Callable[[str], bool],
        recoverer: Recoverer | None = None,
    ) -> None:
        self.state = state
        self.journal = journal
        self.clock = clock
        self.settings = settings
        self.retry_policy = RetryPolicy(settings.retry_max, settings.retry_backoff)
        self.executor = executor
        self.is_backup_action = is_backup
        self.recoverer = recoverer
        self.queues = Queues(lambda run: is_backup(run.action))
        self.running: dict[int, tuple[Run, asyncio.Task[None]]] = {}
        self.counts = Running()
        self.stats = EngineStats()
        self._due: list[tuple[int, int]] = []  # (time, schedaction id)
        self._retries: list[tuple[float, int]] = []  # (not before, run id)
        self._later: list[tuple[float, int, int, str, str, int]] = []  # one-shot runs at a given time
        self._sequence = itertools.count()
        self._open_per_action: Counter[int] = Counter()
        self._retrying: dict[int, dict[int, Run]] = {}  # vm id -> runs waiting for a retry time
        self._fresh: list[Run] = []  # runs queued since the last dispatch
        self._held_others: dict[int, list[Run]] = {}  # host id -> non-backup runs waiting for the host
        self._completed: set[int] = set()  # runs whose success the action recorded itself
        self._cancel_requested: set[int] = set()  # runs an operator cancelled
        self._wake = asyncio.Event()
        self._stopping = False
        self._drained = asyncio.Event()
        self.ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        await self._recover()
        for sa in self.state.pools.get("schedaction", {}).values():
            self._push(sa)
        self._hosts_changed()
        self.state.listeners.append(self._on_change)
        self.ready.set()
        while not self._stopping:
            now = self.clock.now()
            # New runs are journaled with the next commit; each run awaits its row (state running)
            # before its first side effect, so a queued run never needs a commit of its own.
            await self._collect(now)
            self._dispatch()
            self._announce_waiting()
            delay = self._next_wakeup(now)
            if self._wake.is_set():
                self._wake.clear()
                continue
            timer = None if delay is None else asyncio.get_running_loop().call_later(delay, self._wake.set)
            await self._wake.wait()
            if timer is not None:
                timer.cancel()
            self._wake.clear()
        self._drained.set()

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(self, settings: EngineSettings) -> None:
        """New limits and policies apply from the next dispatch; running backups are never stopped."""
        self.settings = settings
        self.wake()

    async def stop(self, drain_time: float | None = None) -> None:
        """Stop new work, let running actions finish for ``drain_time``, then cancel them cleanly."""
        self._stopping = True
        self.wake()
        tasks = [task for _, task in self.running.values()]
        if tasks:
            log.info("waiting up to %ss for %d running action(s)", drain_time, len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_time if drain_time is None else drain_time)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.journal.durable()

    # -- due actions -----------------------------------------------------------------------------
    def _push(self, sa: SchedAction) -> None:
        if schedule.is_pending(sa):
            heapq.heappush(self._due, (sa.time, sa.id))

    def _on_change(self, kind: str, obj_id: int, obj: object | None) -> None:
        if kind == "schedaction":
            if obj is None:
                self._drop_queued(lambda run: run.action_id == obj_id, "its scheduled action was deleted")
            else:
                assert isinstance(obj, SchedAction)
                self._push(obj)
            self.wake()
        elif kind == "vm" and obj is None:
            self._drop_queued(lambda run: run.vm_id == obj_id, "its VM was deleted")
        elif kind == "host":
            self._hosts_changed()
            self.wake()

    def _hosts_changed(self) -> None:
        self.queues.held = any(host.state in _HOST_HELD for host in self.state.pools.get("host", {}).values())
        for host_id in [h for h in self._held_others if not self._host_hold(h)]:
            for run in self._held_others.pop(host_id):  # the host is back: its actions queue again
                self.queues.add(run)

    def _host_hold(self, host_id: int) -> str:
        """Why actions on this host wait ("" when they need not): ERROR, DISABLED, OFFLINE."""
        host = self.state.hosts.find(host_id)
        if host is not None and host.state in _HOST_HELD:
            return f"host {host.name} is {_HOST_HELD[host.state]}"
        return ""

    def _drop_queued(self, which: Callable[[Run], bool], why: str) -> None:
        for run in [r for r in self.queues.queued.values() if which(r)]:
            self.queues.remove(run.id)
            self._close(run, RunState.CANCELLED, why)
        for held in self._held_others.values():
            for run in [r for r in held if which(r)]:
                held.remove(run)
                self._close(run, RunState.CANCELLED, why)
        for runs in self._retrying.values():
            for run in [r for r in runs.values() if which(r)]:
                del runs[run.id]
                self._close(run, RunState.CANCELLED, why)  # its retry-heap entry finds it closed

    async def _collect(self, now: float) -> bool:
        """Journal a run for every due occurrence; True when runs were created."""
        created = False
        while self._retries and self._retries[0][0] <= now:
            _, run_id = heapq.heappop(self._retries)
            run = self.journal.open.get(run_id)
            if run is not None:
                self._retrying.get(run.vm_id, {}).pop(run.id, None)
            if run is not None and run.state is RunState.QUEUED and run.id not in self.queues.queued:
                self.queues.add(run)
        while self._later and self._later[0][0] <= now:
            when, _, vm_id, action, args, priority = heapq.heappop(self._later)
            self._new_run(vm_id, action, args, when, action_id=None, priority=priority)
            created = True
        if not self._due or self._due[0][0] > now:
            return created
        async with self.state.lock:
            while self._due and self._due[0][0] <= now:
                due_time, sa_id = heapq.heappop(self._due)
                sa = self.state.schedactions.find(sa_id)
                if sa is None or sa.time != due_time or not schedule.is_due(sa, int(now)):
                    continue
                if self._open_per_action[sa_id]:
                    continue  # its occurrence is already queued or running
                created |= self._occurrences(sa, now)
        return created

    def _occurrences(self, sa: SchedAction, now: float) -> bool:
        if now - sa.time <= MISSED_GRACE:
            times = [sa.time]
        else:
            times = schedule.due_occurrences(sa, now=int(now), tz=self.settings.tz, policy=self.settings.missed_runs)
        if not times:
            moved = schedule.skip_missed(sa, now=int(now), tz=self.settings.tz)
            log.info("scheduled action %s of VM %s: missed runs skipped (MISSED_RUNS=SKIP)", sa.id, sa.parent_id)
            self.state.update_soon("schedaction", moved)
            return False
        for when in times:
            self._new_run(sa.parent_id, sa.action, sa.args, when, action_id=sa.id)
        return True

    def submit(self, vm_id: int, action: str, args: str, priority: int = 0) -> Run:
        """A one-shot run (``one.vm.backup``); journaled with the next group commit."""
        run = self._new_run(vm_id, action, args, int(self.clock.now()), action_id=None, priority=priority)
        self.wake()
        return run

    def submit_at(self, when: float, vm_id: int, action: str, args: str, priority: int = 0) -> None:
        """A one-shot run due at ``when`` (sub-second precision); journaled when it becomes due."""
        heapq.heappush(self._later, (when, next(self._sequence), vm_id, action, args, priority))
        self.wake()

    def _new_run(self, vm_id: int, action: str, args: str, when: float, action_id: int | None,
                 priority: int = 0) -> Run:
        host_id, datastore_id = self._placement(vm_id, action, args)
        run = self.journal.new_run(
            vm_id=vm_id, action=action, args=args, scheduled=when, action_id=action_id, priority=priority,
            queued_at=self.clock.now(), host_id=host_id, datastore_id=datastore_id,
        )
        if action_id is not None:
            self._open_per_action[action_id] += 1
        self.queues.add(run)
        self._fresh.append(run)
        return run

    def _placement(self, vm_id: int, action: str, args: str) -> tuple[int, int]:
        vm = self.state.vms.find(vm_id)
        bound = vm.host if vm is not None else None
        host_id = bound[0] if bound else -1
        datastore_id = -1
        if self.is_backup_action(action):
            first = args.split(",")[0].strip()
            datastore_id = int(first) if first.lstrip("-").isdigit() else -1
        return host_id, datastore_id

    # -- dispatch --------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self._stopping:
            return
        for run in self.queues.next_others():
            if self._host_hold(run.host_id):  # wait, with the reason, until the host recovers
                self._held_others.setdefault(run.host_id, []).append(run)
                continue
            self._start(run)
        for run in self.queues.next_backups(self.counts, self.settings.limits, self._candidate):
            self._start(run, admitted=True)

    def _announce_waiting(self) -> None:
        """One log line for each new run that could not start at once, with the reason."""
        fresh, self._fresh = self._fresh, []
        if not log.isEnabledFor(logging.INFO):
            return
        for run in fresh:
            if run.id in self.queues.queued:
                reason = self._reason(run)
                if reason:
                    log.info("run %s: %s of VM %s %s", run.id, run.action, run.vm_id, reason)

    def _candidate(self, run: Run) -> Candidate:
        host = self.state.hosts.find(run.host_id)
        datastore = self.state.datastores.find(run.datastore_id)
        return Candidate(
            run.id, float(run.scheduled), run.host_id, host.name if host else str(run.host_id), run.datastore_id,
            datastore.name if datastore else "", run.priority, self._host_hold(run.host_id) or self._ceph_hold(run),
        )

    def _ceph_hold(self, run: Run) -> str:
        """Why a backup of a VM with RBD disks waits: its host cannot reach the cluster ("" otherwise)."""
        host = self.state.hosts.find(run.host_id)
        if host is None or "CEPH_REACH" not in host.template:  # the VM is looked at only for such a host
            return ""
        vm = self.state.vms.find(run.vm_id)
        return ceph_hold(host, vm.template.vectors("DISK")) if vm is not None else ""

    def _start(self, run: Run, admitted: bool = False) -> None:
        now = self.clock.now()
        self.queues.vm_started(run.vm_id)
        run.state, run.started_at, run.attempt = RunState.RUNNING, now, run.attempt + 1
        if admitted:
            self.counts.add(run.host_id, run.datastore_id)
            self._check_limits(run)
        self.journal.save(run)
        self.stats.started[run.action] += 1
        self.running[run.id] = (run, asyncio.create_task(self._execute(run, admitted)))

    def _check_limits(self, run: Run) -> None:
        limits, counts, stats = self.settings.limits, self.counts, self.stats
        stats.max_running = max(stats.max_running, counts.total)
        stats.max_running_host = max(stats.max_running_host, counts.per_host[run.host_id])
        stats.max_running_datastore = max(stats.max_running_datastore, counts.per_datastore[run.datastore_id])
        if (
            (limits.max_backups and counts.total > limits.max_backups)
            or (limits.max_backups_host and counts.per_host[run.host_id] > limits.max_backups_host)
            or (limits.max_backups_datastore and counts.per_datastore[run.datastore_id] > limits.max_backups_datastore)
        ):
            stats.limit_violations += 1
            log.error("limit exceeded starting run %s; this is a bug", run.id)

    async def _execute(self, run: Run, admitted: bool) -> None:
        token = log_context.set({"vm": run.vm_id, "action": run.action_id, "run": run.id})
        try:
            await self.journal.durable()
            started = self.clock.now()
            if run.attempt == 1:
                late = max(0.0, started - run.scheduled)
                self.stats.lateness_histogram.observe(late)
                if self.stats.lateness is not None:
                    self.stats.lateness.append(late)
            log.info("run %s: %s started (attempt %s, queued %.3fs)", run.id, run.action, run.attempt,
                     started - run.queued_at)
            if not await self._clean_up(run):
                raise DriverError("what an earlier attempt left behind could not be cleaned up (see the log); "
                                  "not starting over it", retryable=True)
            message = await self.executor(run, RunSink(run, self.journal, self))
            outcome = succeeded(message or "")
        except asyncio.CancelledError:
            if run.id not in self._cancel_requested:
                await self._interrupted_by_stop(run)
                raise
            outcome = CANCELLED  # by an operator: its cleanup ran; recorded, not retried
        except Exception as exc:
            outcome = failed(exc)
            if outcome.kind is OutcomeKind.INTERNAL:
                log.error("run %s: %s hit an internal error", run.id, run.action, exc_info=exc)
        finally:
            ended = self.clock.now()
            self._release(run, admitted)
            log_context.reset(token)
        await self._finish(run, outcome, ended)

    def _release(self, run: Run, admitted: bool) -> None:
        self.running.pop(run.id, None)
        if admitted:
            self.counts.remove(run.host_id, run.datastore_id)
        self.queues.vm_finished(run.vm_id)
        self.wake()

    async def _interrupted_by_stop(self, run: Run) -> None:
        """Cancelled by shutdown after its cleanup ran: a backup runs again at the next start."""
        if self.is_backup_action(run.action):
            run.state, run.attempt, run.message = RunState.QUEUED, run.attempt - 1, "stopped by a daemon shutdown"
            self.journal.save(run)
        else:
            self._close(run, RunState.INTERRUPTED, "stopped by a daemon shutdown; not run again")
            await self._advance_action(run, success=False, message=run.message)

    # -- outcomes --------------------------------------------------------------------------------
    def stage_success(self, run: Run, m: Mutation) -> None:
        """Record ``run``'s success inside the caller's transaction (``m``), with the caller's own
        result (a backup's image): the run row closed as done and its action's DONE and next TIME
        commit together with it, so a crash can never leave a recorded result whose run is retried."""
        now = self.clock.now()
        m.statements.append(self.journal.done_statement(run, now))
        sa = self.state.schedactions.find(run.action_id) if run.action_id is not None else None
        if sa is not None:
            m.put("schedaction", schedule.after_run(sa, now=int(now), tz=self.settings.tz, success=True))
        m.after_commit.append(lambda: self._completed.add(run.id))

    def cancel_backup(self, vm_id: int) -> Run | None:
        """Stop the VM's backup: a running one is cancelled (its cleanup runs: guest thawed or resumed,
        overlays committed, partial upload removed), a queued one is dropped. Recorded as cancelled,
        never retried; a scheduled action moves on to its next time with MESSAGE saying so."""
        for run, task in self.running.values():
            if run.vm_id == vm_id and self.is_backup_action(run.action):
                self._cancel_requested.add(run.id)
                task.cancel()
                return run
        for run in list(self.queues.queued.values()) + [r for runs in self._retrying.values() for r in runs.values()]:
            if run.vm_id == vm_id and self.is_backup_action(run.action) and run.state is RunState.QUEUED:
                self.queues.remove(run.id)
                self._retrying.get(vm_id, {}).pop(run.id, None)
                self._cancel_requested.add(run.id)
                asyncio.get_running_loop().create_task(self._finish(run, CANCELLED))
                return run
        return None

    async def _finish(self, run: Run, outcome: Outcome, ended: float | None = None) -> None:
        """``ended``: when the run gave its slot back (its finished_at), so that journaled spans never overlap
        the next run's start."""
        now = self.clock.now()
        ended = now if ended is None else ended
        async with self.state.lock:
            if run.id in self._cancel_requested:
                self._cancel_requested.discard(run.id)
                outcome = CANCELLED
            run.outcome, run.error_class = outcome.kind.value, outcome.error_class
            message = outcome.message
            delay = self.retry_policy.delay(outcome, run.attempt, self.is_backup_action(run.action))
            if outcome.kind is OutcomeKind.CANCELLED:
                log.warning("run %s: %s cancelled", run.id, run.action)
                self._close(run, RunState.CANCELLED, "cancelled", ended)
                self._update_action(run, success=False, message="cancelled by an operator")
            elif outcome.success:
                log.info("run %s: %s succeeded in %.3fs", run.id, run.action, now - (run.started_at or now))
                self._close(run, RunState.DONE, message, ended)
                self.stats.last_success[run.vm_id] = now
                if run.id in self._completed:  # the action recorded it with its result
                    self._completed.discard(run.id)
                else:
                    self._update_action(run, success=True, message="")
            elif delay is not None:
                log.warning("run %s: %s failed (attempt %s, %s): %s; retrying in %.0fs", run.id, run.action,
                            run.attempt, outcome.error_class, message, delay)
                self.stats.failures[run.action] += 1
                run.state, run.not_before, run.message = RunState.QUEUED, now + delay, message
                self.journal.save(run)
                self._wait_for_retry(run)
                self._note_failure(run, message)
            else:
                final = RunState.GIVEN_UP if self.is_backup_action(run.action) else RunState.FAILED
                log.error("run %s: %s failed (%s, %s), given up after %s attempt(s): %s", run.id, run.action,
                          outcome.kind.value, outcome.error_class, run.attempt, message)
                self.stats.failures[run.action] += 1
                self.stats.given_up[run.action] += 1
                self._close(run, final, message, ended)
                self._update_action(run, success=False, message=message)
        self.state.flush_soon()

    def _wait_for_retry(self, run: Run) -> None:
        heapq.heappush(self._retries, (run.not_before, run.id))
        self._retrying.setdefault(run.vm_id, {})[run.id] = run

    def _close(self, run: Run, final: RunState, message: str, ended: float | None = None) -> None:
        run.state, run.finished_at, run.message = final, self.clock.now() if ended is None else ended, message
        self.journal.save(run)
        if run.action_id is not None and self._open_per_action[run.action_id] > 0:
            self._open_per_action[run.action_id] -= 1

    async def _advance_action(self, run: Run, success: bool, message: str) -> None:
        async with self.state.lock:
            self._update_action(run, success, message)

    def _update_action(self, run: Run, success: bool, message: str) -> None:
        """After a run's last attempt: DONE/next TIME, or MESSAGE; caller holds the state lock."""
        sa = self.state.schedactions.find(run.action_id) if run.action_id is not None else None
        if sa is None:
            return
        text = "" if success else self._message(message)
        updated = schedule.after_run(sa, now=int(self.clock.now()), tz=self.settings.tz, success=success,
                                     message=text)
        self.state.update_soon("schedaction", updated)

    def _note_failure(self, run: Run, message: str) -> None:
        sa = self.state.schedactions.find(run.action_id) if run.action_id is not None else None
        if sa is not None:
            self.state.update_soon("schedaction", replace(sa, message=self._message(message)))

    def _message(self, error: str) -> str:
        stamp = datetime.fromtimestamp(self.clock.now(), self.settings.tz).strftime("%a %b %d %H:%M:%S %Y")
        return f"{stamp} : {error}"

    def _next_wakeup(self, now: float) -> float | None:
        times: list[float] = []
        if self._due:
            times.append(self._due[0][0])
        if self._retries:
            times.append(self._retries[0][0])
        if self._later:
            times.append(self._later[0][0])
        return None if not times else max(0.0, min(times) - now)

    # -- start-up recovery -----------------------------------------------------------------------
    async def _recover(self) -> None:
        runs = await self.journal.load()
        now = self.clock.now()
        for run in runs:
            if run.action_id is not None:
                self._open_per_action[run.action_id] += 1
            if run.state is RunState.QUEUED:
                self._requeue(run, now)
            elif self.is_backup_action(run.action):
                await self._recover_backup(run, now)
            else:
                told = run.message
                if run.steps:  # what it journaled (a restore's temporary files...) is undone (or finished) first
                    await self._clean_up(run, interrupted=True)
                said = run.message if run.message != told else ""  # a recoverer may say what it did instead
                self._close(run, RunState.INTERRUPTED, said or "interrupted by a daemon restart; not run again")
                await self._advance_action(run, success=False, message=run.message)
        await self.journal.durable()
        if runs:
            log.info("recovered %d open run(s) from the journal", len(runs))

    def _requeue(self, run: Run, now: float) -> None:
        if run.not_before > now:
            self._wait_for_retry(run)
        else:
            self.queues.add(run)

    async def _recover_backup(self, run: Run, now: float) -> None:
        log.warning("run %s: %s was interrupted by a daemon restart; cleaning up", run.id, run.action)
        await self._clean_up(run, interrupted=True)  # what it leaves is tried again before the next attempt
        message = "interrupted by a daemon restart"
        run.outcome, run.error_class = OutcomeKind.RETRYABLE.value, ""
        delay = self.retry_policy.delay(Outcome(OutcomeKind.RETRYABLE, message), run.attempt, retried_action=True)
        if delay is not None:
            run.state, run.message = RunState.QUEUED, message
            run.not_before = now + delay
            self.journal.save(run)
            self._requeue(run, now)
        else:
            self._close(run, RunState.GIVEN_UP, message)
            await self._advance_action(run, success=False, message=message)

    async def _clean_up(self, run: Run, interrupted: bool = False) -> bool:
        """Undo what an earlier attempt of ``run`` journaled (always after a crash); True when nothing
        is left."""
        if self.recoverer is None or not (run.steps or interrupted):
            return True
        try:
            await self.recoverer(run)
        except Exception:  # never let one run's clean-up stop the engine
            log.exception("run %s: clean-up of an earlier attempt failed", run.id)
        self.journal.save(run)
        return not run.steps

    # -- what operators see ----------------------------------------------------------------------
    def waiting_reasons(self) -> dict[int, str]:
        """Run id -> why it does not run yet, for every queued run."""
        reasons = {run.id: f"waiting: {self._host_hold(host_id)}"
                   for host_id, held in self._held_others.items() for run in held}
        for run in self.queues.queued.values():
            reason = self._reason(run)
            if reason:
                reasons[run.id] = reason
        return reasons

    def _reason(self, run: Run) -> str | None:
        if run.vm_id in self.queues.busy_vms:
            return f"waiting: another action of VM {run.vm_id} is running"
        if self.is_backup_action(run.action):
            return blocking_reason(self._candidate(run), self.counts, self.settings.limits)
        return None

    def waiting_reason(self, vm_id: int) -> str | None:
        """Why this VM's queued action does not run yet, or None (shown as SCHED_MESSAGE)."""
        for host_id, held in self._held_others.items():
            if any(run.vm_id == vm_id for run in held):
                return f"waiting: {self._host_hold(host_id)}"
        for run_id in sorted(self.queues.of_vm.get(vm_id, ())):
            reason = self._reason(self.queues.queued[run_id])
            if reason:
                return reason
        for run in self._retrying.get(vm_id, {}).values():
            if run.state is RunState.QUEUED and run.not_before > self.clock.now():
                when = datetime.fromtimestamp(run.not_before, self.settings.tz).strftime("%Y-%m-%d %H:%M:%S %Z")
                return f"waiting: retry {run.attempt + 1} of {run.action} at {when}"
        return None
