"""smki-repository: the certificate repository and revocation server for the GB SMKI."""

import warnings

__version__ = "0.1.0"

# cryptography 51 deprecates DSA, and asyncssh (2.24) names its DSA key classes when it is
# imported: every command would start with that warning on stderr, before its own one-line
# message. It is about asyncssh's import, not about a key in use (the SFTP listener's host
# key is ed25519, listeners/sftp.py): silenced for asyncssh's modules only.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")
