"""The commands over the store and the replica: `import`, `lodge`, `users`, `report`,
`replica`, `export-ldif`, `extract`, `export-ldap-schema`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from repository_server.cli.common import (
    install_loop,
    load_config,
    progress_bar,
    quiet_logging,
    readable,
    run_admin,
    setup_logging,
)
from repository_server.config import Config
from repository_server.errors import UsageError

log = logging.getLogger("smki-repository")


# -- import ---------------------------------------------------------------------------------
async def _import(config: Config, root: Path, allow_unverified: bool,
                  check_signatures: bool) -> int:
    import getpass

    from repository_server.lodging.bulk import import_directory
    from repository_server.lodging.service import Actor, LodgingService
    from repository_server.store import opened_store

    actor = Actor(f"operator:{getpass.getuser()}", peer="cli")
    async with opened_store(config, max_size=4, create=True) as store:  # a first bulk load
        service = LodgingService(store, parse_workers=config.lodge.parse_workers)
        try:
            report = await import_directory(service, root, actor,
                                            allow_unverified_issuer=allow_unverified,
                                            check_signatures=check_signatures,
                                            progress=progress_bar(),
                                            note=lambda m: print(m, file=sys.stderr))
        finally:
            service.close()
    print(f"imported {report.stored:,} new certificates ({report.identical:,} already present,"
          f" {report.unverified:,} with unverified issuer), {report.crls} CRL/ARL, in"
          f" {report.seconds:.1f} s ({report.rate:,.0f} certificates/s);"
          f" {len(report.skipped)} files skipped, {len(report.refused)} refused")
    print(_import_profile(report))
    for line in report.refused[:50]:
        print(f"  refused: {line}", file=sys.stderr)
    if len(report.refused) > 50:
        print(f"  ... and {len(report.refused) - 50} more", file=sys.stderr)
    return 1 if report.refused else 0


def _import_profile(report: Any) -> str:
    """Where each certificate's time went: the workers' CPU by stage (summed over the
    workers, so stages add up to more than the wall time on several cores) and this
    process's waits on the store (COPY transactions, the index build)."""
    n = max(1, report.stored + report.identical)
    us = {k: v * 1e6 / n for k, v in report.worker_seconds.items()}
    workers = ", ".join(f"{k} {us[k]:.0f}" for k in ("read", "parse", "verify", "rows")
                        if k in us)
    wall = report.worker_seconds.get("wall", 0.0)
    if wall:  # below 100 %: the workers waited for a core (other processes, PostgreSQL)
        workers += f" (CPU {100 * report.worker_seconds.get('cpu', 0.0) / wall:.0f} % of wall)"
    text = (f"per certificate, µs: workers (CPU, summed) {workers or 'none'};"
            f" store: COPY {report.copy_seconds * 1e6 / n:.0f}")
    if report.indexes_deferred:
        text += (f", index build {report.index_seconds * 1e6 / n:.0f} ({report.indexes_deferred}"
                 f" indexes built after the load into an empty store, {report.index_seconds:.1f} s)")
    return text


def cmd_import(args: argparse.Namespace) -> int:
    config = load_config(args)
    setup_logging(config)
    root = Path(args.dir)
    if not root.exists():
        raise UsageError(f"DIR: no such file or directory: {root}")
    install_loop()
    return asyncio.run(_import(config, root, args.allow_unverified_issuer,
                               not args.skip_signature_check))


def cmd_lodge(args: argparse.Namespace) -> int:
    import http.client
    import ssl

    from repository_server.cli.lodge_client import LodgeClient, TlsRefused, lodge_files

    if not args.url.startswith("https://"):
        raise UsageError(f"--url must be https://HOST:PORT (got {args.url!r})")
    cert, key = readable("--cert", args.cert), readable("--key", args.key)
    ca = readable("--ca", args.ca) if args.ca else None
    files = [readable("FILE argument", f) for f in args.files]
    if args.batch_size < 1:
        raise UsageError("--batch-size: must be at least 1")
    try:
        client = LodgeClient(args.url, str(cert), str(key), str(ca) if ca else None,
                             on_behalf_of=args.on_behalf_of)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise UsageError(f"--key {key} does not match --cert {cert} (it is not that"
                             " certificate's private key)") from None
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            raise UsageError(f"--ca {ca}: no PEM CA certificate in it") from None
        raise UsageError(f"--cert {cert} / --key {key}: cannot load them as a PEM certificate"
                         f" and its private key ({exc.reason or exc})") from None
    except ValueError as exc:  # --url
        raise UsageError(str(exc)) from None
    flag = None if args.manufacturing_flag is None else args.manufacturing_flag == "true"
    try:
        failures = lodge_files(client, files, name=args.name,
                               trust_anchor=args.trust_anchor, status=args.status,
                               manufacturing_flag=flag, batch_size=args.batch_size,
                               progress=progress_bar())
    except TlsRefused as exc:  # the handshake failed: the message says why and what to check
        print(f"error: {exc}", file=sys.stderr)
        # the server's certificate not trusted is our configuration (--ca): 2; the server
        # refusing our client certificate is a refusal: 1
        return 2 if isinstance(exc.__cause__, ssl.SSLCertVerificationError) else 1
    except (ssl.SSLError, http.client.RemoteDisconnected) as exc:
        # TLS 1.3: the server checks our certificate after the handshake, then sends an alert
        # or just closes the connection: either way it refused the client certificate
        why = (exc.reason or exc) if isinstance(exc, ssl.SSLError) else "closed without an answer"
        print(f"error: {args.url} refused the TLS connection ({why}): is --cert {cert} the DCC"
              " lodging client it accepts?", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach {args.url}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 1 if failures else 0


def cmd_users(args: argparse.Namespace) -> int:
    from repository_server.cli import admin

    action = args.action
    if action == "forecast" and not args.clear:  # checked before the store is opened
        if args.per_day is None:
            raise UsageError("users forecast: give --per-day N (requests per 24 hours), or"
                             " --clear")
        admin.parse_bands(args.bands or "25,25,25,25")
    if action == "add":
        return run_admin(args, lambda store, _c: admin.users_add(
            store, args.name, role="operator" if args.operator else "party",
            api_key=args.api_key, with_key=not args.no_api_key))
    if action == "list":
        return run_admin(args, lambda store, _c: admin.users_list(store, as_json=args.json))
    if action in ("disable", "enable"):
        return run_admin(args, lambda store, _c: admin.users_disable(store, args.name,
                                                                    action == "disable"))
    if action == "reset":
        return run_admin(args, lambda store, _c: admin.users_reset(store, args.name))
    if action == "apikey":
        return run_admin(args, lambda store, _c: admin.users_apikey(store, args.name, args.set))
    if action == "sshkey":
        text = None
        if args.add:
            try:
                text = readable("--add", args.add).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--add: cannot read {args.add}: {exc}") from None
        return run_admin(args, lambda store, _c: admin.users_sshkey(store, args.name, text,
                                                                  args.clear))
    return run_admin(args, lambda store, _c: admin.users_forecast(
        store, args.name, args.per_day, args.bands, args.clear))


def cmd_report(args: argparse.Namespace) -> int:
    from repository_server.cli import admin

    if args.kind == "cpm":
        return run_admin(args, lambda store, config: admin.report_cpm(
            store, config.service_levels, args.month, args.json))
    if args.kind == "tls-refusals":
        return run_admin(args, lambda store, _c: admin.report_tls_refusals(store, args.hours,
                                                                         args.json))
    return run_admin(args, lambda store, config: admin.report_demand(
        store, config.service_levels, args.day, args.json))


@contextlib.asynccontextmanager
async def opened_replica(config: Config, store: Any,
                         progress: Callable[[int, int], None] | None = None
                         ) -> AsyncIterator[Any]:
    """This node's read replica (built if missing, caught up with the store), as the catalog
    the read interfaces use: what `serve` would answer with."""
    from repository_server.readmodel.catalog import Catalog
    from repository_server.readmodel.feed import Feeder

    feeder = Feeder.for_node(config, store.dsn)
    replica = feeder.replica
    try:
        await feeder.ensure(progress)
        await feeder.catch_up()
        catalog = Catalog(store, replica)
        catalog.ready = True
        yield catalog
    finally:
        await feeder.close()
        replica.close()


def cmd_replica(args: argparse.Namespace) -> int:
    """`replica status|verify|rebuild`: this node's read replica against the store."""
    from repository_server.readmodel.check import lag, verify
    from repository_server.readmodel.env import ReplicaUnavailable
    from repository_server.readmodel.feed import Feeder
    from repository_server.store import feed as feed_sql
    from repository_server.store import opened_store

    config = load_config(args)
    setup_logging(config)
    path = config.path(config.replica.path)

    async def run() -> int:
        async with opened_store(config, max_size=2) as store:
            feeder = Feeder.for_node(config, store.dsn)
            replica = feeder.replica
            bar = progress_bar()
            try:
                if args.action == "rebuild":
                    started = time.perf_counter()
                    written = await feeder.build(lambda done, total: bar("replica", done, total))
                    took = time.perf_counter() - started
                    print(f"replica rebuilt at {path}: {written:,} certificates in {took:.1f} s"
                          f" ({written / took if took else 0:,.0f}/s), {replica.size_bytes() / 1e6:,.0f}"
                          " MB; running servers reopen it within a second")
                    started = time.perf_counter()
                    await feeder.fill_search()  # else the node's feeder does it once it reopens
                    took = time.perf_counter() - started
                    print(f"RFC 4387 search index: {written:,} certificates in {took:.1f} s"
                          f" ({written / took if took else 0:,.0f}/s),"
                          f" {replica.size_bytes() / 1e6:,.0f} MB in all")
                    return 0
                if not replica.exists():
                    print(f"error: no replica at {path} (a server builds it when it starts, or"
                          " run `smki-repository replica rebuild`)", file=sys.stderr)
                    return 1
                try:
                    replica.open()
                    state = lag(replica)
                except ReplicaUnavailable as exc:
                    print(f"error: {exc}; run `smki-repository replica rebuild`", file=sys.stderr)
                    return 1
                if args.action == "status":
                    state.update(path=str(path), bytes=replica.size_bytes(), **replica.counts())
                    print(json.dumps(state, indent=2))
                    return 0
                if not args.no_catch_up:
                    # up to the primary's head: a feed from a lagging streaming replica
                    # (database.replica_url) takes what it lacks from the primary
                    async with store.pool.acquire() as conn:
                        head = await feed_sql.head(conn)
                    await feeder.catch_up(head)
                async with store.pool.acquire() as conn:
                    report = await verify(replica, conn)
                if report.ok:
                    print(f"replica at {path} equals the store (change {report.store_applied},"
                          f" {replica.counts()['certs']:,} certificates)")
                    return 0
                print(f"replica at {path} differs from the store:")
                for line in report.differences[:100]:
                    print(f"  {line}")
                if len(report.differences) > 100:
                    print(f"  ... and {len(report.differences) - 100} more")
                print("run `smki-repository replica rebuild` to rebuild it", file=sys.stderr)
                return 1
            finally:
                await feeder.close()
                replica.close()

    return asyncio.run(run())


def cmd_export_ldif(args: argparse.Namespace) -> int:
    """The directory as LDIF, streamed a page at a time (bounded memory)."""
    from repository_server.listeners.ldap.directory import Directory
    from repository_server.listeners.ldap.ldif import entry_ldif
    from repository_server.store import opened_store

    config = load_config(args)
    quiet_logging(config)

    async def run(out: Any) -> int:
        count = 0
        async with opened_store(config, max_size=2) as store, \
                opened_replica(config, store) as catalog:
            directory = Directory(catalog, suffix=config.ldap.suffix, root_dse={})
            async for entry in directory.all_entries():
                out.write(entry_ldif(entry))
                count += 1
                if count % 50_000 == 0:
                    print(f"export-ldif: {count} entries", file=sys.stderr)
        return count

    if args.out in (None, "-"):
        count = asyncio.run(run(sys.stdout))
    else:
        target = Path(args.out)
        partial = target.with_name(target.name + ".partial")
        try:
            fh = partial.open("w", encoding="ascii")
        except OSError as exc:
            raise UsageError(f"--out: cannot write {partial}: {exc.strerror or exc}") from None
        try:
            with fh:
                count = asyncio.run(run(fh))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)  # a half-written export is never left under the real name
    print(f"export-ldif: {count} entries", file=sys.stderr)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """One extract now (waiting for a scheduled one in progress anywhere in the cluster)."""
    from repository_server.cli.admin import AdminError
    from repository_server.extracts.writer import ExtractWriter

    async def work(store: Any, config: Config) -> str:
        from repository_server.extracts.replica import ReplicaPages
        from repository_server.readmodel.feed import Feeder
        from repository_server.store import feed as feed_sql

        ex = config.extracts
        # This node's read replica, if it has a usable one: the extract is read from it
        # (caught up to the markers first), not from PostgreSQL. None is built here.
        feeder = Feeder.for_node(config, store.dsn)
        pages = None
        if feeder.replica.exists():
            async with store.pool.acquire() as conn:
                source = await feed_sql.identity(conn)
            why = await asyncio.to_thread(feeder.usable, source)
            if why:
                print(f"extract: not reading the read replica ({why}): reading PostgreSQL",
                      file=sys.stderr)
            else:
                pages = ReplicaPages(feeder.replica, feeder.catch_up)
        writer = ExtractWriter(store, config.path(ex.dir), compression=ex.compression,
                               page_size=ex.page_size, retain_full=ex.retain_full,
                               progress=progress_bar(), replica=pages)
        try:
            async with store.extract_lock(wait=True):
                try:
                    done = await writer.produce(args.kind)
                except OSError as exc:  # a full disk, above all: one line, not a traceback
                    raise AdminError(f"extract failed, nothing was published: {exc}"
                                     f" (extracts.dir {writer.directory})") from exc
        finally:
            await feeder.close()
            feeder.replica.close()
        if args.json:
            return json.dumps({"name": done.name, "kind": done.kind, "path": str(done.path),
                               "size": done.size, "sha256": done.sha256, "counts": done.counts,
                               "removed": done.removed, "read_from": done.source}, indent=2)
        lines = [f"{done.path}", f"  {done.kind}, {done.size} bytes, sha256 {done.sha256},"
                                 f" read from {done.source}",
                 "  " + ", ".join(f"{k} {v}" for k, v in done.counts.items())]
        lines += [f"  retention removed {name}" for name in done.removed]
        return "\n".join(lines)

    return run_admin(args, work)


def cmd_export_ldap_schema(args: argparse.Namespace) -> int:
    from repository_server.listeners.ldap.schema import openldap_schema

    text = openldap_schema()
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            raise UsageError(f"--out: cannot write {args.out}: {exc.strerror or exc}") from None
    return 0
