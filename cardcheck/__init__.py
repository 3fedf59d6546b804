"""cardcheck: see every bank card issued under your name."""
