"""The torchrun FSDP trainer with GPU-side augmentation (issue 4)."""
