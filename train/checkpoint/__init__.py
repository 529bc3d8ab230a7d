"""gridtrain.train.checkpoint: saving, verifying, resuming and resharding checkpoints."""
