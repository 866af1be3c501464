"""export: LoRA merge to 16-bit safetensors and GGUF files for llama.cpp."""
