"""Subcommands of the boldstream CLI, one module each."""
