"""App-layer libraries behind the command-line tools (tools/*.py): they may import every other layer; nothing in
the library imports them."""
