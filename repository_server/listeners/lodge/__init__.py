"""The lodging listener: the DCC's mutual-TLS HTTP API (`app`) and its OpenAPI description
(`openapi`). The rules it applies are in `repository_server.lodging`."""
