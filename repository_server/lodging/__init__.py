"""The write path, and nothing else: validation and storage of lodged objects."""
