"""hvr_common."""
