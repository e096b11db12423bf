"""The ``edgeqra`` subcommands, one module each; :mod:`edgeqra.cli` assembles the parser."""
