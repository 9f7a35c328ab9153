"""Pure functions over `cryptography`, no I/O: the GB SMKI certificate profile.

`der` (the TLV reader, shared with the LDAP codec) -> `structure` (byte-exact pieces of a
certificate or CRL) -> `names`, `signatures`, `lint` -> `certificates`, `crls` (the parsers,
raising `errors.ParseError`); `pem` unwraps lodged input; `ids` (EUI-64, serial and key
identifier forms), `model` (the parse results), `certstore` (RFC 4387 search keys) and
`testpki` (a test PKI in the profile).
"""
