"""Signature checks over the original TBS bytes (never a re-encoding), for ECDSA, RSA
(PKCS #1 v1.5 and RSASSA-PSS with its parameters) and EdDSA issuer keys. They never raise:
a bad signature, an unsupported key or algorithm or unparseable input is False.
"""

from __future__ import annotations

import functools

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from repository_server.pki.der import children, read_tlv
from repository_server.pki.model import CertInfo
from repository_server.pki.oids import (
    DIGEST_HASH,
    ECDSA_HASH,
    OID_ED448,
    OID_ED25519,
    OID_MGF1,
    OID_RSA_PSS,
    RSA_PKCS1_HASH,
)
from repository_server.pki.structure import SEQUENCE, AlgId, Signed, expect

__all__ = ["remember_signed", "verify_crl_signature", "verify_signature", "verify_signed"]

# The most recent (der, signature layout) from parse_certificate: bulk paths parse then
# verify the same certificate at once, and walking its DER again cost ~20 us.
_LAST_SIGNED: tuple[bytes, Signed] | None = None


def remember_signed(der: bytes, signed: Signed) -> None:
    """Keep the layout `parse_certificate` just walked for a `verify_signature` of the very
    same `der` object that follows."""
    global _LAST_SIGNED
    _LAST_SIGNED = (der, signed)


@functools.lru_cache(maxsize=4096)
def _load_public_key(spki: bytes) -> PublicKeyTypes | None:
    try:
        return serialization.load_der_public_key(spki)
    except Exception:
        return None


def _pss_padding(params: bytes) -> tuple[padding.PSS, hashes.HashAlgorithm] | None:
    """RSASSA-PSS-params (RFC 4055); defaults SHA-1 / MGF1-SHA-1 / salt 20."""
    digest: hashes.HashAlgorithm = hashes.SHA1()
    mgf_digest: hashes.HashAlgorithm = hashes.SHA1()
    salt = 20
    if params:
        top = expect(read_tlv(params, 0, len(params)), SEQUENCE, "RSASSA-PSS-params")
        for tag, _start, cs, ce in children(params, top[2], top[3]):
            inner = read_tlv(params, cs, ce)
            if tag == 0xA0:
                alg = AlgId(params, inner)
                if alg.oid not in DIGEST_HASH:
                    return None
                digest = DIGEST_HASH[alg.oid]
            elif tag == 0xA1:
                mgf = AlgId(params, inner)
                if mgf.oid != OID_MGF1 or not mgf.params:
                    return None
                mgf_alg = AlgId(mgf.params, read_tlv(mgf.params, 0, len(mgf.params)))
                if mgf_alg.oid not in DIGEST_HASH:
                    return None
                mgf_digest = DIGEST_HASH[mgf_alg.oid]
            elif tag == 0xA2:
                salt = int.from_bytes(params[inner[2] : inner[3]], "big")
    return padding.PSS(mgf=padding.MGF1(mgf_digest), salt_length=salt), digest


def verify_signed(signed: Signed, issuer_public_key_der: bytes) -> bool:
    key = _load_public_key(bytes(issuer_public_key_der))
    if key is None:
        return False
    oid, tbs, sig = signed.alg.oid, signed.tbs, signed.signature
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            digest = ECDSA_HASH.get(oid)
            if digest is None:
                return False
            key.verify(sig, tbs, ec.ECDSA(digest))
        elif isinstance(key, rsa.RSAPublicKey):
            if oid in RSA_PKCS1_HASH:
                key.verify(sig, tbs, padding.PKCS1v15(), RSA_PKCS1_HASH[oid])
            elif oid == OID_RSA_PSS:
                pss = _pss_padding(signed.alg.params)
                if pss is None:
                    return False
                key.verify(sig, tbs, pss[0], pss[1])
            else:
                return False
        elif isinstance(key, ed25519.Ed25519PublicKey):
            if oid != OID_ED25519:
                return False
            key.verify(sig, tbs)
        elif isinstance(key, ed448.Ed448PublicKey):
            if oid != OID_ED448:
                return False
            key.verify(sig, tbs)
        else:
            return False
    except InvalidSignature:
        return False
    except Exception:  # odd key/algorithm combinations: not a valid signature
        return False
    return True


def verify_signature(cert_der_or_info: CertInfo | bytes, issuer_public_key_der: bytes) -> bool:
    """True if the certificate's signature verifies under `issuer_public_key_der` (a DER
    SubjectPublicKeyInfo). Works on the original TBS bytes; never raises: a bad signature,
    an unsupported key or algorithm, or an unparseable certificate gives False."""
    der = cert_der_or_info.der if isinstance(cert_der_or_info, CertInfo) else cert_der_or_info
    last = _LAST_SIGNED
    if last is not None and last[0] is der:
        signed = last[1]  # parse_certificate just walked this very object: reuse the walk
    else:
        try:
            signed = Signed(bytes(der), "certificate")
        except Exception:  # not even the outer structure: cannot verify
            return False
    return verify_signed(signed, issuer_public_key_der)


def verify_crl_signature(crl_der: bytes, issuer_public_key_der: bytes) -> bool:
    """True if the CRL's signature verifies under the issuer's DER SubjectPublicKeyInfo."""
    try:
        signed = Signed(bytes(crl_der), "CRL")
    except Exception:  # not even the outer structure: cannot verify
        return False
    return verify_signed(signed, issuer_public_key_der)

