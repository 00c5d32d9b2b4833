"""The conformance kit for backend authors (see docs/plugin-authors.md)."""
