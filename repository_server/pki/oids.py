"""Object identifiers the GB profile checks and the hashes of the signature algorithms the
signature checks support (RFC 5758 ECDSA, RFC 8017 PKCS #1 v1.5 and RSASSA-PSS, RFC 8410
EdDSA), with the names findings use for them.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

OID_HW_MODULE_NAME = "1.3.6.1.5.5.7.8.4"
OID_UNIQUE_ID = "2.5.4.45"
OID_OU = "2.5.4.11"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_P256 = "1.2.840.10045.3.1.7"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_RSA_PSS = "1.2.840.113549.1.1.10"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_ED25519 = "1.3.101.112"
OID_ED448 = "1.3.101.113"
OID_RSA = "1.2.840.113549.1.1.1"

ECDSA_HASH: dict[str, hashes.HashAlgorithm] = {
    "1.2.840.10045.4.1": hashes.SHA1(),
    "1.2.840.10045.4.3.1": hashes.SHA224(),
    "1.2.840.10045.4.3.2": hashes.SHA256(),
    "1.2.840.10045.4.3.3": hashes.SHA384(),
    "1.2.840.10045.4.3.4": hashes.SHA512(),
}
RSA_PKCS1_HASH: dict[str, hashes.HashAlgorithm] = {
    "1.2.840.113549.1.1.5": hashes.SHA1(),
    "1.2.840.113549.1.1.14": hashes.SHA224(),
    "1.2.840.113549.1.1.11": hashes.SHA256(),
    "1.2.840.113549.1.1.12": hashes.SHA384(),
    "1.2.840.113549.1.1.13": hashes.SHA512(),
}
DIGEST_HASH: dict[str, hashes.HashAlgorithm] = {
    "1.3.14.3.2.26": hashes.SHA1(),
    "2.16.840.1.101.3.4.2.4": hashes.SHA224(),
    "2.16.840.1.101.3.4.2.1": hashes.SHA256(),
    "2.16.840.1.101.3.4.2.2": hashes.SHA384(),
    "2.16.840.1.101.3.4.2.3": hashes.SHA512(),
}
ALG_NAMES = {
    "1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.5": "sha1WithRSAEncryption",
    OID_RSA_PSS: "RSASSA-PSS",
    OID_RSA: "rsaEncryption",
    OID_EC_PUBLIC_KEY: "id-ecPublicKey",
    OID_ED25519: "Ed25519",
    OID_ED448: "Ed448",
}
