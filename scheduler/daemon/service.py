"""`vmsched serve`: wire the store, the objects, the API and the HTTP listeners together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from drivers.ssh import SshSettings
from scheduler import faults
from scheduler.actions.executor import RecovererByAction, make_executor, simulated_durations
from scheduler.actions.registry import is_backup
from scheduler.api.auth import SessionCache
from scheduler.api.methods import Context, make_authenticator, registry
from scheduler.api.server import Dispatcher, make_app
from scheduler.backup import flatten
from scheduler.backup.recovery import make_recoverer
from scheduler.config import Config, load_config
from scheduler.daemon import bootstrap
from scheduler.daemon.demo import provision as provision_demo
from scheduler.daemon.systemd import Notifier
from scheduler.engine.admission import Limits
from scheduler.engine.clock import Clock, SystemClock
from scheduler.engine.journal import Journal
from scheduler.engine.loop import Engine, EngineSettings
from scheduler.engine.metrics import render as render_metrics
from scheduler.engine.progress import ProgressBoard
from scheduler.errors import ConfigError, StoreError
from scheduler.hosts.dsmonitor import DatastoreMonitor
from scheduler.hosts.links import HostLinks
from scheduler.hosts.monitor import HostMonitor
from scheduler.logs import setup_logging
from scheduler.restore import in_place as restore_run
from scheduler.restore import to_images as image_restore
from scheduler.store.codecs import build_codecs
from scheduler.store.sqlite import Store
from scheduler.store.state import State

log = logging.getLogger(__name__)

DB_FILE = "vmsched.db"


def resolve_config(state_dir: Path, config_path: Path | None) -> tuple[Config, Path | None]:
    if config_path is None and (state_dir / "sched.conf").is_file():
        config_path = state_dir / "sched.conf"
    if config_path is None:
        return Config.defaults(), None
    return load_config(config_path), config_path


def run_daemon(state_dir: Path, config_path: Path | None, demo: bool | None = None) -> int:
    """``demo``: set up the demo (scheduler.daemon.demo); None = only when running on built-in defaults."""
    try:
        config, used = resolve_config(state_dir, config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    setup_logging(config.log)
    log.info("configuration: %s", used or "built-in defaults")
    try:
        demo = used is None if demo is None else demo
        return asyncio.run(Daemon(state_dir, config, config_path=used, demo=demo).run())
    except StoreError as exc:
        log.error("%s", exc)
        print(f"vmsched: {exc}", file=sys.stderr)
        return 1


def engine_settings(config: Config) -> EngineSettings:
    return EngineSettings(
        limits=Limits(config.max_backups, config.max_backups_host, config.max_backups_datastore),
        retry_max=config.retry.max,
        retry_backoff=float(config.retry.backoff),
        missed_runs=config.missed_runs,
        timezone=config.timezone,
        drain_time=float(config.drain_time),
    )


@dataclass(frozen=True)
class Parts:
    """What the daemon wired together at start-up."""

    state: State
    links: HostLinks
    engine: Engine
    context: Context
    dispatcher: Dispatcher
    board: ProgressBoard
    simulated: bool  # VMSCHED_SIMULATE_ACTIONS is set: no host is real


class Daemon:
    def __init__(self, state_dir: Path, config: Config, clock: Clock | None = None,
                 config_path: Path | None = None, demo: bool = False) -> None:
        self.state_dir = state_dir
        self.demo = demo
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.stopping = asyncio.Event()
        self.notifier = Notifier()
        self.engine: Engine | None = None
        self.context: Context | None = None
        self.monitor: HostMonitor | None = None
        self.ds_monitor: DatastoreMonitor | None = None

    def db_path(self) -> Path:
        return self.config.db.path or self.state_dir / DB_FILE

    async def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = await Store.open(self.db_path())
        try:
            await self._serve_until_stopped(await self._build(store))
        finally:
            await store.close()
        log.info("stopped")
        return 0

    async def _build(self, store: Store) -> Parts:
        """Load the state and wire the collaborators; nothing runs yet."""
        state = State(store, build_codecs())
        await state.load()
        await bootstrap.ensure_admin(state, self.state_dir, self.clock)
        links = HostLinks(self.state_dir, SshSettings.from_config(self.config.ssh, self.state_dir))
        journal = Journal(state)
        simulate = simulated_durations()
        if faults.armed():
            log.warning("%s is set: the daemon kills itself at %s (test use only)", faults.CRASH_ENV,
                        ", ".join(sorted(faults.armed())))
        board = ProgressBoard()
        executor = make_executor(state, self.clock, simulate, links, self, progress=board)
        recoverer = RecovererByAction(make_recoverer(state, links), {"restore": restore_run.make_recoverer(state, links)})
        self.engine = engine = Engine(state, journal, self.clock, engine_settings(self.config), executor,
                                      is_backup=is_backup, recoverer=recoverer)
        self.context = context = Context(state=state, config=self.config, clock=self.clock,
                                         state_dir=self.state_dir, engine=engine, links=links, progress=board)
        sessions = SessionCache(self.clock.now, ttl=self.config.session_cache_ttl)
        dispatcher = Dispatcher(registry, make_authenticator(context, sessions), context)
        if not simulate:  # the hosts of a simulation are not real: nothing to monitor
            self.monitor, self.ds_monitor = HostMonitor(context), DatastoreMonitor(context)
        return Parts(state, links, engine, context, dispatcher, board, simulated=bool(simulate))

    async def _serve_until_stopped(self, parts: Parts) -> None:
        """Recover, start the engine, the monitors and the API; on SIGTERM drain and stop them in order."""
        engine = parts.engine
        self._install_signals()
        engine_task = asyncio.create_task(engine.run(), name="engine")
        await engine.ready.wait()  # start-up recovery done
        if not parts.simulated:
            await image_restore.recover_interrupted(parts.state, parts.links)
            await flatten.recover(parts.state, parts.links)
        monitor_task = self._start_monitors()
        gc.freeze()  # what start-up loaded lives on: keep it out of every later collection
        app = make_app(parts.dispatcher, self.config.message_size, metrics=partial(render_metrics, engine, parts.board))
        runner = await self._serve(app)
        self.notifier.ready(self._status())
        watchdog = asyncio.create_task(self._watchdog(engine_task))
        demo_task = asyncio.create_task(provision_demo(parts.context), name="demo") if self.demo else None
        await self.stopping.wait()
        if demo_task is not None:
            demo_task.cancel()
        log.info("stopping: no new work; running actions get %ss to finish", self.config.drain_time)
        self.notifier.stopping()
        watchdog.cancel()
        await runner.cleanup()  # no API calls during the drain
        monitor_task.cancel()
        await asyncio.gather(monitor_task, return_exceptions=True)
        await engine.stop(float(self.config.drain_time))
        engine_task.cancel()
        await asyncio.gather(engine_task, watchdog, return_exceptions=True)
        await parts.links.close()
        await parts.state.close()

    def _start_monitors(self) -> asyncio.Task[object]:
        if self.monitor is None or self.ds_monitor is None:
            log.warning("host monitoring is off while actions are simulated")
            return asyncio.create_task(asyncio.Event().wait(), name="no monitor")
        return asyncio.create_task(_both(self.monitor.run(), self.ds_monitor.run()), name="monitors")

    def _status(self) -> str:
        engine = self.engine
        if engine is None:
            return "starting"
        return f"{len(engine.running)} running, {len(engine.queues)} queued"

    async def _watchdog(self, engine_task: asyncio.Task[None]) -> None:
        """WATCHDOG=1 only while the engine is alive; STATUS= lines for systemctl status."""
        interval = self.notifier.watchdog_interval or 30.0
        while True:
            if engine_task.done():
                log.error("the engine stopped unexpectedly: %r", engine_task.exception() if not engine_task.cancelled() else None)
                self.stopping.set()
                return
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            self.notifier.status(self._status())
            await asyncio.sleep(interval)

    def reload(self) -> None:
        """SIGHUP: read sched.conf again; limits apply at once. An invalid file keeps the old config."""
        if self.config_path is None:
            log.info("SIGHUP: no configuration file (built-in defaults); nothing to reload")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running configuration: %s", problem)
            return
        restart_needed = [name for name in ("listen", "db", "log") if getattr(new, name) != getattr(self.config, name)]
        if restart_needed:
            log.warning("reload: %s changed and take effect at the next restart", ", ".join(k.upper() for k in restart_needed))
        self.config = new
        if self.context is not None:
            self.context.config = new
        if self.engine is not None:
            self.engine.reconfigure(engine_settings(new))
        if self.monitor is not None:
            self.monitor.reconfigure()
        if self.ds_monitor is not None:
            self.ds_monitor.reconfigure()
        log.info("reloaded %s: MAX_BACKUPS=%s MAX_BACKUPS_HOST=%s MAX_BACKUPS_DATASTORE=%s", self.config_path,
                 new.max_backups, new.max_backups_host, new.max_backups_datastore)

    async def _serve(self, app: web.Application) -> web.AppRunner:
        """Start every listener, then say where they are (the lines come once all of them accept)."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        listen = self.config.listen
        lines = []
        if listen.address:
            tcp = web.TCPSite(runner, listen.address, listen.port, reuse_address=True)
            await tcp.start()
            server = tcp._server
            assert isinstance(server, asyncio.Server)
            port = server.sockets[0].getsockname()[1]  # the real port when PORT is 0
            host = f"[{listen.address}]" if ":" in listen.address else listen.address
            lines.append(f"listening on http://{host}:{port}/RPC2")
        if listen.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.unix_socket)
            await web.UnixSite(runner, str(listen.unix_socket)).start()
            os.chmod(listen.unix_socket, 0o660)
            lines.append(f"listening on unix:{listen.unix_socket}")
        for line in lines:
            print(line, flush=True)
            log.info("%s", line)
        return runner

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)


async def _both(first: Coroutine[Any, Any, None], second: Coroutine[Any, Any, None]) -> None:
    """Run two loops that only end when cancelled; cancelling this cancels both."""
    await asyncio.gather(first, second)
