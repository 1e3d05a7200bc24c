"""torpor."""
