"""aiohttp applications for the read listeners (http, https): downloads, operations."""
