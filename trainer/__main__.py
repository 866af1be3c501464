"""`python -m trainer ...` (what torchrun launches): the same commands as the `trainer` script."""

from cli import trainer

trainer(prog_name="trainer")
