"""Activation recompute (gradient checkpointing) of the decoder layers: off, on or offload.

`on` keeps each layer's input on the device and recomputes the layer in backward
(torch.utils.checkpoint, non-reentrant). `offload` also moves each layer's input to pinned
CPU memory in forward (non-blocking copies on a side stream) and brings it back in backward,
prefetching the next layer down while the current one recomputes, so only one or two layer
inputs stay on the GPU. On CPU the copies are plain references and there are no streams, so the
same code path runs in tests.

The mode is ModelOptions.recompute, fixed when the decoder is built (trainer/models/decoder.py). Both
modes run the recompute inside the layer's own `recomputing()`. A recomputed layer's outputs are only
differentiated (offload) or dropped (torch.utils.checkpoint keeps just the tensors saved for
backward), never read, so a layer may skip work whose only product is its output value: the decoder's
fused MLP then leaves out its down projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ActivationOffloader:
    """Layer inputs parked in host memory, keyed by layer index, with one-ahead prefetch back to the device.

    Two ways to park them. By default each offload copies into fresh pinned memory (torch's caching host
    allocator) and marks the input as used by the side stream, so the caller may drop it at once. Within
    `static_capacity` elements (set by trainer.graphs for CUDA graph capture) each layer copies into a
    pinned buffer of its own that lives as long as this object, and nothing depends on the allocator's
    cross-stream bookkeeping, which a capture cannot use: the input is kept referenced until the compute
    stream has waited for its copy (at the next offload, a layer later, or at the first fetch), and a
    fetched input is allocated on the compute stream before the side stream writes it. A captured graph
    then replays the same copies into the same host buffers.
    """

    def __init__(self) -> None:
        # key -> (host copy, device, its copy's event, whether in a static buffer)
        self.stored: dict[int, tuple[torch.Tensor, torch.device, Any, bool]] = {}
        # key -> (device copy, its copy's event, whether allocated on the compute stream)
        self.fetched: dict[int, tuple[torch.Tensor, Any, bool]] = {}
        self.stream: torch.cuda.Stream | None = None
        self.static_capacity = 0  # elements per layer input that go to a static buffer (0: none do)
        self.static: dict[int, torch.Tensor] = {}
        # the last input copied to a static buffer and its copy's event, until the compute stream waits for it
        self.held: tuple[torch.Tensor, Any] | None = None

    def clear(self) -> None:
        """Drop every parked and fetched layer input (after a failed step); the static buffers stay."""
        self.stored.clear()
        self.fetched.clear()
        self.held = None

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def _release_held(self, device: torch.device) -> None:
        if self.held is not None:
            torch.cuda.current_stream(device).wait_event(self.held[1])
            self.held = None

    def _static_buffer(self, key: int, x: torch.Tensor) -> torch.Tensor:
        buf = self.static.get(key)
        if buf is None:  # allocated once, outside any capture (trainer.graphs warms up eagerly first)
            buf = self.static[key] = torch.empty(self.static_capacity, dtype=x.dtype, pin_memory=True)
        assert buf.dtype == x.dtype, (buf.dtype, x.dtype)
        return buf[:x.numel()].view(x.shape)

    def offload(self, key: int, x: torch.Tensor) -> None:
        """Start copying x to pinned host memory; x may be freed by the caller right after."""
        stream = self._side_stream(x.device)
        if stream is None:
            self.stored[key] = (x.detach(), x.device, None, False)
            return
        static = x.numel() <= self.static_capacity
        if static:
            self._release_held(x.device)  # the previous layer's input: copied by now, a layer of compute ago
            host = self._static_buffer(key, x)
        else:
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            host.copy_(x.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        if static:
            self.held = (x, done)
        else:
            # the side stream reads x after the caller drops it: keep its memory from being reused too early
            x.record_stream(stream)
        self.stored[key] = (host, x.device, done, static)

    def prefetch(self, key: int) -> None:
        """Start the copy of layer `key`'s input back to its device (no-op if absent or already fetched)."""
        if key not in self.stored or key in self.fetched:
            return
        host, device, offloaded, static = self.stored.pop(key)
        stream = self._side_stream(device)
        if stream is None:
            self.fetched[key] = (host, None, False)
            return
        if static:
            # allocated on the compute stream, written on the side stream once the compute stream got here
            x = torch.empty(host.shape, dtype=host.dtype, device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            if offloaded is not None:
                stream.wait_event(offloaded)
            if static:
                x.copy_(host, non_blocking=True)
            else:
                x = host.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self.fetched[key] = (x, done, static)

    def fetch(self, key: int) -> torch.Tensor:
        """Layer `key`'s input on its device, ready for use on the current stream."""
        self.prefetch(key)
        x, done, static = self.fetched.pop(key)
        if done is not None:
            current = torch.cuda.current_stream(x.device)
            current.wait_event(done)
            # every copy before this one on the side stream is waited for now, the held input's too
            self.held = None
            if not static:
                x.record_stream(current)
        return x


class _OffloadedLayerFunction(torch.autograd.Function):
    """Run a layer without keeping activations; in backward fetch its input back and recompute."""

    @staticmethod
    def forward(ctx, layer: nn.Module, offloader: ActivationOffloader, index: int, x: torch.Tensor,
                *args: Any) -> torch.Tensor:
        ctx.layer, ctx.offloader, ctx.index, ctx.args = layer, offloader, index, args
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        # a CUDA graph capture cannot read the generator's state; trainer.graphs captures no dropout
        keep_rng = not (x.is_cuda and torch.cuda.is_current_stream_capturing())
        ctx.cpu_rng = torch.get_rng_state() if keep_rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if keep_rng and x.is_cuda else None
        offloader.offload(index, x)
        with torch.no_grad():
            return layer(x, *args)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x = ctx.offloader.fetch(ctx.index)
        ctx.offloader.prefetch(ctx.index - 1)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        devices = [x.device] if x.device.type == "cuda" else []
        # replay the forward's dropout masks without disturbing the caller's random stream
        keep_rng = ctx.cpu_rng is not None
        with torch.random.fork_rng(devices=devices, device_type=device_type if devices else "cuda",
                                   enabled=keep_rng):
            if keep_rng:
                torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            x = x.detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on), \
                    ctx.layer.recomputing():
                out = ctx.layer(x, *ctx.args)
            torch.autograd.backward(out, grad_out)
        return (None, None, None, x.grad) + (None,) * len(ctx.args)


class OffloadedLayer(nn.Module):
    """A decoder layer whose input is offloaded in forward and which is recomputed in backward, inside the
    layer's `recomputing()` context.

    The wrapped layer's children are registered as this module's own, so parameter names (and
    with them saved adapters) stay those of the plain layer.
    """

    def __init__(self, layer: nn.Module, index: int, offloader: ActivationOffloader):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        self.index, self.offloader = index, offloader
        for name, child in layer.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.layer(x, *args)
        if not x.requires_grad:
            # a frozen embedding gives a constant input; the Function's output must still carry the
            # graph to this layer's trainable parameters
            x = x.detach().requires_grad_(True)
        return _OffloadedLayerFunction.apply(self.layer, self.offloader, self.index, x, *args)
