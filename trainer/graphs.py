"""CUDA graphs for training: a micro-batch's forward and backward captured once per shape, then replayed.

Why: at the Llama-3-8B shape on an H100 the eager step is host-bound. Its ~25,000 kernel launches per
optimizer step cost the host more time than the GPU needs to run them, so the GPU waits (bench/README.md,
where a step's time goes; bench/KERNEL_NOTES.md). A replay queues a whole micro-batch with one call.

A replay equals the eager run because everything it reads lives at the addresses the capture saw:
- the token ids, labels and 1 / (the step's target count) are copied into buffers captured with it;
- the LoRA gradients exist before the capture, which then accumulates into them in place, so
  train_step zeroes them in place instead of dropping them (optimizer.zero_grad(set_to_none=False));
- the parameters change only in place (the optimizer step), which replays read;
- nothing inside waits for the GPU: the fused cross-entropy keeps every row while capturing (ignored
  targets get no loss or gradient in its kernel), and the labels' range is checked here on the host.

Offloaded checkpointing is captured too: each layer's input goes to a pinned host buffer of its own,
sized for `max_tokens` and allocated once, so a replay's copies land where the capture's did
(trainer.recompute.ActivationOffloader's static buffers).

Not captured (those micro-batches run eagerly, as before): packed rows (the decoder looks for document
boundaries on the GPU and waits for the answer), attention that needs a mask or a score softcap
(FlexAttention; Gemma 2, sliding windows shorter than the batch), LoRA dropout, data parallelism, and with
offload micro-batches of more than `max_tokens` tokens. A capture that fails warns once and leaves its
shape to the eager path. trainer.loop pads unpacked rows to the lengths of `padded_length`, so that shapes
repeat.

Memory: the graphs' temporaries live in one private pool shared by every captured shape (replays never
overlap). torch counts them as reserved, not allocated, outside the capture: compare reserved memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from trainer.data import IGNORE_INDEX, Batch

MAX_SHAPES = 32  # each new shape costs two eager warm-up passes and a capture
WARMUP_PASSES = 2  # lazy work (Triton compiles, cuBLAS handles, launch caches) must happen before capture


def forward_backward(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     position_ids: torch.Tensor | None, num_items: int | torch.Tensor,
                     autocast_dtype: torch.dtype, scale: int = 1) -> torch.Tensor:
    """One micro-batch: the loss (sum over its targets / num_items) and its backward; the loss, detached."""
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        out = model(input_ids, labels=labels, position_ids=position_ids, num_items_in_batch=num_items)
    (out.loss * scale if scale != 1 else out.loss).backward()
    return out.loss.detach()


def padded_length(longest: int, max_seq_len: int) -> int:
    """The length to pad a micro-batch whose longest row is `longest` to, for graph replay: the next of four
    steps per doubling (16 tokens apart from 64 to 128, 32 to 256, ..., 256 from 1,024 to 2,048), not past
    max_seq_len (nor below `longest`). Padding to the longest row makes a new shape, and a new capture, of
    nearly every length in chat data; these steps leave four shapes per doubling and pad a row by less
    than a quarter of its length."""
    step = max(16, 1 << max(0, (longest - 1).bit_length() - 3))
    return max(longest, min(-(-longest // step) * step, max_seq_len))


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    labels: torch.Tensor
    num_items: torch.Tensor
    loss: torch.Tensor


def unsupported_reason(model: nn.Module, max_tokens: int | None = None) -> str | None:
    """Why `model`'s micro-batches cannot be captured at all, or None (see the module docstring)."""
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "offloader"):
        return "not a trainer CausalLM"
    if decoder.offloader is not None and not max_tokens:
        return "offloaded gradient checkpointing needs the largest micro-batch's token count for its host buffers"
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return "LoRA dropout"
    if model.spec.attn_softcap is not None:
        return "an attention score softcap (FlexAttention)"
    return None


class MicroBatchGraphs:
    """Forward + backward of `model`'s micro-batches as CUDA graphs, one per (batch, length) shape.

    `run(batch, num_items)` replays the shape's graph (capturing it first) and returns the loss, or None
    where that batch must take the eager path. The gradients of `params` are created (zero) on first use
    and must afterwards be zeroed in place, never set to None. Under offloaded checkpointing `max_tokens`
    (rows x length of the largest micro-batch to capture) sizes the host buffers: the layers' inputs,
    max_tokens x hidden each, in pinned host memory for as long as the model's offloader lives.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], *, autocast_dtype: torch.dtype,
                 device: torch.device, max_tokens: int | None = None):
        assert device.type == "cuda", device
        self.model, self.params, self.autocast_dtype, self.device = model, params, autocast_dtype, device
        self.reason = unsupported_reason(model, max_tokens)
        self.max_tokens = max_tokens
        self.offloader = model.model.offloader if self.reason is None else None
        if self.offloader is not None:
            self.offloader.static_capacity = max_tokens * model.spec.hidden_size
        self.captured: dict[tuple[int, ...], _Captured] = {}
        self.failed: set[tuple[int, ...]] = set()
        self.pool = torch.cuda.graph_pool_handle()
        self.vocab = model.model.embed_tokens.num_embeddings
        self.grads: list[torch.Tensor] | None = None
        self.replays = 0

    def accepts(self, batch: Batch) -> bool:
        """Whether `batch` takes a graph: a supported model, one document per row, a shape not failed before."""
        if self.reason is not None or not batch.plain_positions:
            return False
        shape = tuple(batch.input_ids.shape)
        if shape in self.failed or (shape not in self.captured and len(self.captured) >= MAX_SHAPES):
            return False
        if self.offloader is not None and batch.input_ids.numel() > self.max_tokens:
            return False  # more than the host buffers hold
        windows = [w for w in self.model.spec.sliding_windows if w is not None]
        return not any(w < shape[1] for w in windows)  # a window shorter than the rows needs a mask

    def run(self, batch: Batch, num_items: int) -> torch.Tensor | None:
        """The micro-batch's forward and backward by graph replay; its loss (a fresh tensor), or None
        if this shape could not be captured (the caller runs it eagerly)."""
        self._check_labels(batch.labels)
        self._own_grads()
        shape = tuple(batch.input_ids.shape)
        captured = self.captured.get(shape)
        if captured is None:
            captured = self._capture(batch, num_items)
            if captured is None:
                return None
        captured.input_ids.copy_(batch.input_ids.pin_memory(), non_blocking=True)
        captured.labels.copy_(batch.labels.pin_memory(), non_blocking=True)
        captured.num_items.fill_(num_items)
        captured.graph.replay()
        self.replays += 1
        return captured.loss.clone()

    def _check_labels(self, labels: torch.Tensor) -> None:
        # the eager path's fused cross-entropy checks this on the GPU, which a graph cannot wait for
        counted = labels[labels != IGNORE_INDEX]
        if counted.numel() and not (0 <= int(counted.min()) and int(counted.max()) < self.vocab):
            raise ValueError(f"labels outside [0, {self.vocab}): {int(counted.min())}..{int(counted.max())}")

    def _own_grads(self) -> None:
        """Gradients that exist and stay where the graphs accumulate into them."""
        if self.grads is not None and all(p.grad is g for p, g in zip(self.params, self.grads, strict=True)):
            return
        if self.captured:
            # someone replaced or dropped them: the captured graphs write to the old ones
            self.captured.clear()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]

    def _capture(self, batch: Batch, num_items: int) -> _Captured | None:
        from trainer.kernels.lora_fused import cached_factor_casts

        shape = tuple(batch.input_ids.shape)
        ids = batch.input_ids.to(self.device)
        labels = batch.labels.to(self.device)
        n = torch.tensor(num_items, dtype=torch.int64, device=self.device)
        # the warm-up passes accumulate into the gradients: park them in host memory meanwhile (a device copy
        # would add their size, 336 MB at the Llama-3-8B shape, to the run's peak)
        kept = [g.to("cpu") for g in self.grads]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_PASSES):
                    with cached_factor_casts(fresh=True):
                        forward_backward(self.model, ids, labels, None, n, self.autocast_dtype)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # the factor casts inside are captured too, in a cache of the graph's own
            with torch.cuda.graph(graph, pool=self.pool), cached_factor_casts(fresh=True):
                loss = forward_backward(self.model, ids, labels, None, n, self.autocast_dtype)
        except Exception as e:  # noqa: BLE001 - any failure leaves this shape to the eager path
            self.failed.add(shape)
            warnings.warn(f"CUDA graph capture of micro-batches {shape[0]} x {shape[1]} failed ({type(e).__name__}: "
                          f"{e}); they run eagerly", RuntimeWarning, stacklevel=3)
            return None
        finally:
            torch._foreach_copy_(self.grads, kept)
            del kept
        captured = _Captured(graph, ids, labels, n, loss)
        self.captured[shape] = captured
        return captured
