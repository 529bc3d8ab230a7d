"""gridtrain.slurm: Slurm batch scripts (the template and site environment file are package data),
the batch script's start/end decisions, hostlists, and Slurm client commands."""
