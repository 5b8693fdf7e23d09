"""Ray Train edge: the distributed training loop and the TorchTrainer around it."""
