"""One readable file per RLHF stage."""
