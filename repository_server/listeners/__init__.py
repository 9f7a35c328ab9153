"""The listeners: one package per interface (`http` with its portal, `ldap`, `lodge`, and the
`sftp` module). A listener decodes requests, asks the services and the read model, and
encodes answers; it never imports another listener. Shared HTTP description helpers are in
`apidoc`."""
