"""Flow-following mask reconstruction and batch inference over directories."""
