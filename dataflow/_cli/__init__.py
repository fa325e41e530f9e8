"""Subcommands of the ``dataflow`` command, one module each (see ``dataflow.cli``)."""
