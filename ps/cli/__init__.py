"""Command-line entry points: ps-server, ps-worker, ps-launch (build_parser -> config -> run -> main)."""
