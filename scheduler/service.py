"""`vmsched serve`: wire the store, the objects, the API and the HTTP listeners together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from scheduler import bootstrap
from scheduler.api import Context, build_codecs, make_authenticator, registry
from scheduler.auth import SessionCache
from scheduler.clock import Clock, SystemClock
from scheduler.config import Config, load_config
from scheduler.errors import ConfigError, StoreError
from scheduler.logs import setup_logging
from scheduler.server import Dispatcher, make_app
from scheduler.state import State
from scheduler.store import Store

log = logging.getLogger(__name__)

DB_FILE = "vmsched.db"


def resolve_config(state_dir: Path, config_path: Path | None) -> tuple[Config, Path | None]:
    if config_path is None and (state_dir / "sched.conf").is_file():
        config_path = state_dir / "sched.conf"
    if config_path is None:
        return Config.defaults(), None
    return load_config(config_path), config_path


def run_daemon(state_dir: Path, config_path: Path | None) -> int:
    try:
        config, used = resolve_config(state_dir, config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    setup_logging(config.log)
    log.info("configuration: %s", used or "built-in defaults")
    try:
        return asyncio.run(Daemon(state_dir, config).run())
    except StoreError as exc:
        log.error("%s", exc)
        print(f"vmsched: {exc}", file=sys.stderr)
        return 1


class Daemon:
    def __init__(self, state_dir: Path, config: Config, clock: Clock | None = None) -> None:
        self.state_dir = state_dir
        self.config = config
        self.clock = clock or SystemClock()
        self.stopping = asyncio.Event()

    def db_path(self) -> Path:
        return self.config.db.path or self.state_dir / DB_FILE

    async def run(self) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = await Store.open(self.db_path())
        try:
            state = State(store, build_codecs())
            await state.load()
            await bootstrap.ensure_admin(state, self.state_dir, self.clock)
            context = Context(state=state, config=self.config, clock=self.clock, state_dir=self.state_dir)
            sessions = SessionCache(self.clock.now, ttl=self.config.session_cache_ttl)
            dispatcher = Dispatcher(registry, make_authenticator(context, sessions), context)
            self._install_signals()
            runner = await self._serve(make_app(dispatcher, self.config.message_size))
            await self.stopping.wait()
            log.info("stopping")
            await runner.cleanup()
        finally:
            await store.close()
        return 0

    async def _serve(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        listen = self.config.listen
        tcp = web.TCPSite(runner, listen.address, listen.port, reuse_address=True)
        await tcp.start()
        port = tcp._server.sockets[0].getsockname()[1]  # the real port when PORT is 0
        if listen.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.unix_socket)
            await web.UnixSite(runner, str(listen.unix_socket)).start()
            os.chmod(listen.unix_socket, 0o660)
            log.info("listening on unix:%s", listen.unix_socket)
        host = f"[{listen.address}]" if ":" in listen.address else listen.address
        print(f"listening on http://{host}:{port}/RPC2", flush=True)
        log.info("listening on http://%s:%s/RPC2", host, port)
        return runner

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
