"""What every training stage shares: its config base, the optimiser, the step loop, checkpoints,
and supervised fine-tuning (SFT's loss, which rejection sampling and ReST reuse)."""
