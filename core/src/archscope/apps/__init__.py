"""The applications built on the runtime and the methods: the command line (`apps.cli`), the
per-model profile (`apps.bench`) and the activation store (`apps.store`)."""
