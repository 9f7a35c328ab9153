"""Which media types a lodged document may have, and how a download names it. No I/O.

The repository serves documents on the portal's origin: a document served inline as HTML or
SVG would run its script beside the portal. So a document's type is one of an allow-list
(`ALLOWED`), checked when it is lodged (anything else is stored as application/octet-stream)
and again when it is served (a type stored by an earlier version is not trusted either), and
every download is an attachment (`disposition`) sent with `nosniff` and a sandboxing CSP
(`DOWNLOAD_HEADERS`). Only text types keep a parameter, a well-formed charset.
"""

from __future__ import annotations

import re
from urllib.parse import quote

OCTET_STREAM = "application/octet-stream"

# media type -> the file extension a download is named with
ALLOWED: dict[str, str] = {
    "application/pdf": "pdf",
    "text/plain": "txt",
    "application/xml": "xml",
    "text/xml": "xml",
    "application/zip": "zip",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "application/vnd.ms-powerpoint": "ppt",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": "pptx",
    "application/vnd.oasis.opendocument.text": "odt",
    "application/vnd.oasis.opendocument.spreadsheet": "ods",
    OCTET_STREAM: "bin",
}
_TEXTUAL = frozenset({"text/plain", "text/xml", "application/xml"})  # may carry a charset

# the names a document may have (the store's CHECK constraint says the same)
DOCUMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_CHARSET = re.compile(r'charset=("?)([A-Za-z0-9][A-Za-z0-9._:+-]{0,39})\1', re.ASCII)
_TOKEN_SAFE = re.compile(r"[^A-Za-z0-9._-]", re.ASCII)

# sent with every document download (and the portal's)
DOWNLOAD_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


def is_document_name(name: str) -> bool:
    return DOCUMENT_NAME.fullmatch(name) is not None


def safe_type(declared: str) -> str:
    """The type a document is stored and served with: the declared media type if it is on
    the allow-list (lower-cased), with `; charset=X` kept only for text types and only when
    well formed; application/octet-stream for anything else."""
    media, _, params = declared.partition(";")
    media = media.strip().lower()
    if media not in ALLOWED:
        return OCTET_STREAM
    if media in _TEXTUAL:
        for param in params.split(";"):
            found = _CHARSET.fullmatch(param.strip().lower())
            if found:
                return f"{media}; charset={found.group(2)}"
    return media


def extension(content_type: str) -> str:
    """The file extension of a type `safe_type` returned."""
    return ALLOWED.get(content_type.partition(";")[0], "bin")


def disposition(name: str, content_type: str) -> str:
    """Content-Disposition of a document download: an attachment named NAME.EXT (RFC 6266;
    the extension from the served type, not repeated when the name already ends with it).
    A name with characters outside [A-Za-z0-9._-] gets an ASCII fallback and filename*."""
    ext = "." + extension(content_type)
    filename = name if name.lower().endswith(ext) else name + ext
    fallback = _TOKEN_SAFE.sub("_", filename)
    if fallback == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
