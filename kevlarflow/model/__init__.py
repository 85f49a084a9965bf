"""Random-weight Hugging Face checkpoints (tests, demos) and their presets."""
