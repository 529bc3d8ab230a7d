"""slurm/: the batch script template and the site environment file `gridtrain submit` renders from (package data, no code)."""
