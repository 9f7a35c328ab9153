"""The browser portal for relying-party staff (HTML on the http and https listeners)."""
