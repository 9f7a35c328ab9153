"""The sample SMKI documents of a test PKI: two one-page PDFs and a text file."""

from __future__ import annotations

__all__ = ["documents"]


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _one_page_pdf(title: str, lines: list[str]) -> bytes:
    """A small, valid one-page PDF (Helvetica text) with a correct cross-reference table."""
    ops = ["BT", "/F1 16 Tf", "72 760 Td", f"({_pdf_escape(title)}) Tj", "/F1 11 Tf"]
    for line in lines:
        ops += ["0 -20 Td", f"({_pdf_escape(line)}) Tj"]
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Title (" + _pdf_escape(title).encode("latin-1") + b") /Producer (smki-repository) >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode() + b"0000000000 65535 f \n"
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\n"
        f"startxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


def documents(generated_at: str) -> list[tuple[str, str, bytes]]:
    """(file name, content type, bytes) of the sample SMKI documents."""
    note = f"Test document generated {generated_at} by smki-repository. Not a SEC text."
    return [
        (
            "SMKI-Device-Certificate-Policy.pdf",
            "application/pdf",
            _one_page_pdf(
                "SMKI Device Certificate Policy",
                ["Smart Energy Code Appendix A (test copy).", note],
            ),
        ),
        (
            "SMKI-Organisation-Certificate-Policy.pdf",
            "application/pdf",
            _one_page_pdf(
                "SMKI Organisation Certificate Policy",
                ["Smart Energy Code Appendix B (test copy).", note],
            ),
        ),
        (
            "SMKI-Recovery-Procedure.txt",
            "text/plain; charset=utf-8",
            (
                "Smart Metering Key Infrastructure: SMKI Recovery Procedure (test copy)\n"
                "======================================================================\n\n"
                "1. The DCC notifies Subscribers of the compromise of a Relevant Private Key.\n"
                "2. The Recovery Certificate is used to replace Trust Anchor Cells.\n"
                f"\n{note}\n"
            ).encode(),
        ),
    ]
