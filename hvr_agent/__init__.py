"""hvr_agent."""
