"""The `smki-repository` command: `main` (argument parsing and the commands), `admin` (the
`users` and `report` commands) and `lodge_client` (the DCC side of the `lodge` command)."""
