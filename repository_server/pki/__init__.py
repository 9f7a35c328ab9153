"""Pure functions over `cryptography`: GB profile parsing and lint, identifiers, test PKI."""
