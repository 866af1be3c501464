"""trainer: a compact QLoRA trainer with one decoder for six model families."""
