"""Training: batches, checkpoints, the DPO math and the one training loop SFT and DPO share."""
