"""smki-repository: the certificate repository and revocation server for the GB SMKI."""

__version__ = "0.1.0"
