"""The learning-forgetting benchmark: LoRA on a target task while measuring what the model forgets
of a source domain (``lalora bench``; docs/benchmark.md)."""
