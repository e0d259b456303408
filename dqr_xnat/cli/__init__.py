"""Command-line shell. Each sub-module (except ``main``) is one subcommand.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` with ``run(args) -> int``. ``main`` discovers them, so adding a command is adding a file.
"""
