"""The training drivers: GeoLoRAOptimizer, the Trainer callback, every way of running the step, DDP/FSDP2, TRL, rank
adaptation."""
