"""Image sources, validation, the manifest and its hash-based splits."""
