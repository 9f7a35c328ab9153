"""Who may read what: the one read-access rule, for every interface (downloads, the web
service, LDAP, the portal, extracts over HTTPS and SFTP). No I/O.

An object is *public* when anyone may read it: the CA certificates (root, issuing and
organisation CAs), every CRL and ARL, and the policy documents (`CertRecord.public`). Anything
else (device and organisation certificates, searches over them, extracts) is *private*: it
may be read by an authenticated reader (an API key, a bound LDAP user, a signed-in portal
user, an SFTP user), or by anyone when the interface's `open_reads` setting says so
(`web.open_reads` for HTTP, `ldap.open_reads` for LDAP).

A reader who may not read a private object learns no more about it than the interface must
say. Over HTTP, where the URL itself names the object, that is that it needs credentials
(401 or 403). Over LDAP a private entry the reader may not read is not disclosed at all: a
base at or below one is noSuchObject, with only the readable organisational unit as the
matched DN, exactly as for an entry that does not exist (what slapd answers with
`access to dn.children=... by users read by * none`); searches leave such entries out.
Who may keep an answer follows from the same rule (`cache_scope`): one anyone may read may
be kept by shared caches (`Cache-Control: public`), any other only by the reader's own.

Each interface holds one `ReadAccess` built from its configuration: HTTP (downloads, the web
service, extracts over HTTPS) from `web.open_reads`, LDAP from `ldap.open_reads`. SFTP has no
such setting, so every SFTP session authenticates. The portal asks for a signed-in user on
every page; its downloads go through the HTTP rule with that user as the reader.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadAccess:
    """The read rule of one interface: its `open_reads` setting."""

    open_reads: bool = False

    def may_read(self, *, public: bool, authenticated: bool) -> bool:
        """Whether a reader (authenticated or not) may read an object (public or not)."""
        return public or self.open_reads or authenticated

    def may_read_private(self, *, authenticated: bool) -> bool:
        """Whether a reader may read private objects at all (searches over device and
        organisation certificates, extracts)."""
        return self.open_reads or authenticated

    def may_read_all(self, publics: list[bool], *, authenticated: bool) -> bool:
        """Whether a reader may read every one of several objects (a search's answer)."""
        return self.may_read_private(authenticated=authenticated) or all(publics)

    def shared(self, *, public: bool) -> bool:
        """Whether anyone may read the object (it is public, or reads are open), so that a
        shared cache may keep the answer (`Cache-Control: public`); otherwise the answer is
        for the reader who asked and only its own cache may keep it (`private`)."""
        return self.may_read(public=public, authenticated=False)

    def cache_scope(self, *, public: bool) -> str:
        """The Cache-Control scope of an answer about the object: "public" or "private"."""
        return "public" if self.shared(public=public) else "private"
