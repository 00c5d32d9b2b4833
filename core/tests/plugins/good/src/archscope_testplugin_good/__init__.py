"""Test-only archscope plugin used by the core's plugin-system tests."""
