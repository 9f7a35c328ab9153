"""What every command shares: the configuration from its options, logging, the event loop,
progress output, and running an admin task against the store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from repository_server.config import Config, load
from repository_server.errors import UsageError

log = logging.getLogger("smki-repository")


def setup_logging(config: Config) -> None:
    from repository_server.obs.logs import setup

    setup(config.log.level, config.log.format)


def quiet_logging(config: Config) -> None:
    """Commands that print their own results: warnings only (without a time stamp in text;
    in JSON, as every log line is)."""
    if config.log.format == "json":
        from repository_server.obs.logs import setup

        setup("WARNING", "json")
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")


def load_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    return load(args.config or os.environ.get("SMKI_CONFIG") or None, data_dir=args.data_dir,
                overrides=overrides)


def install_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


def progress_bar() -> Any:
    from repository_server.cli.lodge_client import Progress

    return Progress()


def smki_command() -> str:
    """This installation's command (the virtualenv's bin/smki-repository, which need not be
    on PATH), for commands the demo prints."""
    beside = Path(sys.executable).parent / "smki-repository"
    return str(beside) if beside.is_file() else "smki-repository"


# -- lodge ----------------------------------------------------------------------------------
def readable(option: str, name: str) -> Path:
    """A file an option names, or a UsageError saying which option and which file."""
    path = Path(name).expanduser()
    if not path.exists():
        raise UsageError(f"{option}: no such file: {path}")
    if not path.is_file():
        raise UsageError(f"{option}: not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option}: cannot read {path} (permission denied)")
    return path


# -- users / report -------------------------------------------------------------------------
def run_admin(args: argparse.Namespace, work: Any) -> int:
    """Run `work(store, config)` (an admin coroutine returning text) against the store."""
    from repository_server.cli.admin import AdminError
    from repository_server.store import opened_store

    config = load_config(args)
    quiet_logging(config)

    async def run() -> str:
        async with opened_store(config, max_size=2) as store:
            text: str = await work(store, config)
            return text

    try:
        print(asyncio.run(run()))
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
