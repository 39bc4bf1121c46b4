"""Running one job as many processes: ranks (static splits under torchrun / SLURM), claims (runs that share an
output folder split the work), progress records (one per process, read back by `latentctl status`)."""
