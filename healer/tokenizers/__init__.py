"""Tokenizer checks and repairs: slow<->fast comparison, conversion, special tokens, corpus."""
