"""Benchmark logic (functions that return table rows); thin CLIs in tools/ print them."""
