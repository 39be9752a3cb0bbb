"""hvrctl."""
