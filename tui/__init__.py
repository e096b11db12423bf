"""The Textual terminal UI (installed as ``edgeqra.tui``)."""
