"""Command-line entry points (thin: parse, call the package, turn user errors into one line)."""
