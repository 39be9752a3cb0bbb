"""hvr_listener."""
