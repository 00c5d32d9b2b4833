"""A plugin that calls sys.exit() while it is imported (a script-style module)."""

import sys

sys.exit("this plugin exits on import on purpose")
