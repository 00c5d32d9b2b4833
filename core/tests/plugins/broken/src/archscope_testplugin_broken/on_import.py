"""Fails as soon as it is imported."""

raise ImportError("this plugin is broken on purpose (needs a package that is not installed)")
