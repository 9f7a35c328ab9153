"""Extract downloads over SFTP (asyncssh), listener `sftp` (default 127.0.0.1:2222).

Users are the repository's: public-key authentication against the keys an operator set
(`users sshkey NAME --add FILE`), or the user's portal password (refused while it must still
be changed; wrong ones count towards the portal's SEC lockout, as LDAP binds do). A disabled
user gets nowhere. The session is the SFTP subsystem only (no shell, exec, scp or port
forwarding), read-only, chrooted to the extracts directory, where it sees published
extracts and nothing else: a `.partial-` file being written is neither listed nor
openable, and every write, remove, rename, mkdir or attribute change is refused with
"permission denied".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import (
    FXF_ACCESS_DISPOSITION,
    FXF_APPEND,
    FXF_CREAT,
    FXF_OPEN_EXISTING,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPAttrs,
    SFTPName,
    SFTPNoSuchFile,
    SFTPPermissionDenied,
)

from repository_server.access import ReadAccess
from repository_server.accounts import Accounts
from repository_server.config import Config
from repository_server.extracts import format as fmt

log = logging.getLogger(__name__)

_WRITE_ACCESS = 0x00000002 | 0x00000004 | 0x00000100  # ACE4 write data, append data, write attrs


def host_key(path: Path) -> asyncssh.SSHKey:
    """The server's host key, made (ed25519, mode 0600) on first start."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(path))
        path.chmod(0o600)
        log.info("made the SFTP host key %s (%s)", path, key.get_fingerprint("sha256"))
    return asyncssh.read_private_key(str(path))


class _ReadOnlyExtracts(asyncssh.SFTPServer):
    """Chrooted to the extracts directory; only published extract names exist."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], directory: Path) -> None:
        super().__init__(chan, chroot=str(directory).encode())

    @staticmethod
    def _denied(*_args: Any) -> None:
        raise SFTPPermissionDenied("read-only: extracts cannot be changed")

    remove = rename = posix_rename = mkdir = rmdir = symlink = link = _denied  # type: ignore[assignment]
    setstat = lsetstat = fsetstat = _denied  # type: ignore[assignment]

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        raise SFTPPermissionDenied("read-only: extracts cannot be changed")

    def map_path(self, path: bytes) -> bytes:
        normal = posixpath.normpath(posixpath.join(b"/", path))
        name = normal.lstrip(b"/")
        if name and not fmt.is_extract_name(name.decode("utf-8", "replace")):
            raise SFTPNoSuchFile("no such extract")
        return super().map_path(path)

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        if pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC):
            self._denied()
        return super().open(path, pflags, attrs)

    def open56(self, path: bytes, desired_access: int, flags: int,
               attrs: SFTPAttrs) -> object:
        if desired_access & _WRITE_ACCESS or (flags & FXF_ACCESS_DISPOSITION) != FXF_OPEN_EXISTING:
            self._denied()
        return super().open56(path, desired_access, flags, attrs)

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        async for entry in super().scandir(path):
            name = entry.filename
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
            if text in (".", "..") or fmt.is_extract_name(text):
                yield entry


class _Auth(asyncssh.SSHServer):
    def __init__(self, service: SftpService) -> None:
        self.service = service
        self.peer = "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def begin_auth(self, username: str) -> bool:
        """Whether the user must authenticate: extracts are private (`ReadAccess`)."""
        return not self.service.access.may_read_private(authenticated=False)

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return False  # passwords through the password method only: one attempt counts once

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        offered = key.public_data
        for line in await self.service.accounts.ssh_keys(username):
            with contextlib.suppress(asyncssh.KeyImportError, ValueError):
                if asyncssh.import_public_key(line).public_data == offered:
                    return True
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        return await self.service.accounts.password_login(
            username, password, actor="sftp", action="sftp.login", peer=self.peer) is not None


class SftpService:
    def __init__(self, config: Config, accounts: Accounts, directory: Path) -> None:
        self.config = config
        self.accounts = accounts
        self.directory = directory
        self.access = ReadAccess()  # no setting opens SFTP: every session authenticates
        self.server: asyncssh.SSHAcceptor | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        ex = self.config.extracts
        key = await asyncio.to_thread(host_key, self.config.path(ex.sftp_host_key))
        self.directory.mkdir(parents=True, exist_ok=True)
        directory = self.directory
        self.server = await asyncssh.create_server(
            lambda: _Auth(self), host, port, server_host_keys=[key],
            sftp_factory=lambda chan: _ReadOnlyExtracts(chan, directory), allow_scp=False,
            agent_forwarding=False, x11_forwarding=False, allow_pty=False,
            login_timeout=ex.sftp_login_timeout_seconds, reuse_address=True,
            reuse_port=self.config.listeners.reuse_port or None)
        return host, self.server.get_port()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None
