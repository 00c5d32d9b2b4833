"""A gated linear recurrence LM (no package covers it) and its archscope backend."""
