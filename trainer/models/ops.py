"""The decoder's hot paths as plain functions of tensors.

Each function is the PyTorch reference that a Triton kernel in trainer/kernels/ later replaces
behind the same signature; none of them holds module state. Masks and documents are derived
here too, so a FlexAttention/varlen path can replace `attention_mask` + `attention` as a pair.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

IGNORE_INDEX = -100
# What `attention` takes: None (plain causal), a dense boolean mask, or a FlexAttention BlockMask.
LayerMask = torch.Tensor | BlockMask | None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0, *,
             kernel: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + weight), in float32, returned in x's dtype (Gemma: offset=1).

    kernel=True runs trainer.kernels' Triton version (ModelOptions.use_kernels decides), as do the other
    functions here that take `kernel`."""
    if kernel:  # imported lazily: importing Triton costs time the CPU-only paths need not pay
        from trainer.kernels import rms_norm as triton_version

        return triton_version(x, weight, eps, offset)
    # One rounding at the end: Llama's transformers code rounds the normalized x to bf16 before the
    # weight multiply; computing both in float32 is at least as accurate and is what a kernel does.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0, *, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + residual: the residual stream and the next norm's output."""
    if kernel:
        from trainer.kernels import add_rms_norm as triton_version

        return triton_version(x, residual, weight, eps, offset)
    s = x + residual
    return s, rms_norm(s, weight, eps, offset)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 2 * len(inv_freq)] in float32 from integer positions [B, T]."""
    # Integer -> float32 is exact up to 2**24; bfloat16 would collapse 8189..8191 onto 8192.
    assert not positions.is_floating_point(), "positions must be integers"
    # An elementwise product, not a matmul: a matmul may run in TF32 on GPUs and lose the low bits.
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               head_dim: int, *, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the projection outputs q [B, T, H * head_dim] and k [B, T, KV * head_dim] (the first
    cos.shape[-1] dims of each head; rotate-half pairing); cos/sin [B|1, T, rotated dims].

    The kernel rotates q and k in place where it can: use the returned tensors, not the arguments.
    """
    if kernel:
        from trainer.kernels import apply_rope as triton_version

        return triton_version(q, k, cos, sin, head_dim)
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    return _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = x.unflatten(-1, (-1, head_dim))
    r = cos.shape[-1]
    xr = heads[..., :r].float()
    x1, x2 = xr.chunk(2, dim=-1)
    out = (xr * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
    out = out if r == head_dim else torch.cat((out, heads[..., r:]), dim=-1)
    return out.flatten(-2)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str, *, kernel: bool = False) -> torch.Tensor:
    """act(gate) * up: SwiGLU (silu) or GeGLU (gelu_tanh, or exact gelu)."""
    if kernel:
        from trainer.kernels import gated_activation as triton_version

        return triton_version(gate, up, activation)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    assert activation == "gelu", activation
    return F.gelu(gate) * up


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token [B, T]: a new document starts wherever a position is not previous + 1.

    This is transformers' rule for packed sequences: positions 0 1 2 0 1 0 1 2 3 are three documents.
    """
    step = position_ids[:, 1:] - position_ids[:, :-1]
    starts = F.pad((step != 1).to(torch.int64), (1, 0), value=0)
    return starts.cumsum(dim=-1)


def attention_mask(documents: torch.Tensor | None, seq_len: int, sliding_window: int | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, T, T] (True = may attend), or None for plain causal attention.

    Query i sees key j when j <= i, both lie in the same document, and i - j < sliding_window.
    `documents` is None when every row holds a single document.
    """
    if documents is None and (sliding_window is None or sliding_window >= seq_len):
        return None
    i = torch.arange(seq_len, device=device)
    allowed = i[:, None] >= i[None, :]
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    allowed = allowed[None]
    if documents is not None:
        allowed = allowed & (documents[:, :, None] == documents[:, None, :])
    return allowed[:, None]


def block_mask(documents: torch.Tensor | None, seq_len: int, sliding_window: int | None,
               device: torch.device) -> BlockMask:
    """FlexAttention's BlockMask for the same rule as `attention_mask` (causal, same document, window)."""
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        allowed = q_idx >= kv_idx
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        if documents is not None:
            allowed = allowed & (documents[b, q_idx] == documents[b, kv_idx])
        return allowed

    batch = None if documents is None else documents.shape[0]
    # Compiled, the mask is built block by block; eager, it materializes [B, T, T] once.
    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device,
                             _compile=torch.device(device).type == "cuda")


@dataclass(frozen=True)
class AttentionShape:
    """The layers' attention as `flex_compiles` tries it: head counts and size, dtype, scale, softcap."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float
    softcap: float | None = None


# (attention shape, mask layout) -> whether compiled FlexAttention ran forward and backward there
_FLEX_VERDICTS: dict[tuple, bool] = {}


def flex_compiles(mask: BlockMask, shape: AttentionShape, rule: tuple = ()) -> bool:
    """Run FlexAttention forward and backward once on random inputs of the layers' shape and this mask.

    torch.compile of flex_attention can fail for some shapes (on the H100, torch 2.11: Inductor's
    NoValidChoicesError for lengths under one 128-token block, float32 and bf16 alike; 228 and 300
    compiled), and the backward is compiled as well, so only a full fwd+bwd proves a shape. It costs
    one attention fwd+bwd per new length. The verdict is kept per shape and mask
    layout (`rule` tells apart masks of one size built by different mask_mods: documents or not, window);
    a failure warns once and the caller takes the dense path. Running out of memory is not
    a compile failure and propagates.
    """
    b, _, q_len, kv_len = mask.shape
    device = mask.kv_num_blocks.device
    key = (shape, rule, b, q_len, kv_len, mask.BLOCK_SIZE, str(device))
    if key not in _FLEX_VERDICTS:
        gen = torch.Generator(device=device).manual_seed(0)

        def rnd(heads: int, length: int) -> torch.Tensor:
            x = torch.randn(b, heads, length, shape.head_dim, device=device, dtype=shape.dtype, generator=gen)
            return x.requires_grad_(True)

        q, k, v = rnd(shape.heads, q_len), rnd(shape.kv_heads, kv_len), rnd(shape.kv_heads, kv_len)
        try:
            with torch.enable_grad():
                out = attention(q, k, v, mask, scale=shape.scale, softcap=shape.softcap)
                torch.autograd.grad(out.sum(), (q, k, v))
            _FLEX_VERDICTS[key] = True
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # Dynamo and Inductor raise many types; each means "not this way"
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            warnings.warn(f"FlexAttention failed its forward+backward trial for {shape}, length {q_len}, "
                          f"mask rule (documents, window) {rule} "
                          f"({type(e).__name__}: {first_line}); using the dense-mask attention path there",
                          RuntimeWarning, stacklevel=2)
            _FLEX_VERDICTS[key] = False
    return _FLEX_VERDICTS[key]


def layer_masks(documents: torch.Tensor | None, seq_len: int, sliding_windows: Iterable[int | None],
                device: torch.device, *, flex: bool, softcap: float | None = None,
                check: AttentionShape | None = None) -> dict[int | None, LayerMask]:
    """The mask for each distinct sliding window, built once per forward and shared by the layers.

    Plain: `attention_mask`'s dense mask (None for plain causal). flex: a BlockMask wherever a mask or
    the score softcap is needed, None where plain causal SDPA (flash) serves. With `check`, a BlockMask
    is kept only where `flex_compiles` proves it for the layers' attention shape; elsewhere the dense
    mask serves.
    """
    masks: dict[int | None, LayerMask] = {}
    for w in set(sliding_windows):
        dense_needed = documents is not None or (w is not None and w < seq_len)
        if flex and (dense_needed or softcap is not None):
            blocks = block_mask(documents, seq_len, w, device)
            if check is None or flex_compiles(blocks, check, rule=(documents is not None, w)):
                masks[w] = blocks
                continue
        masks[w] = attention_mask(documents, seq_len, w, device)
    return masks


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    # Eager flex_attention materializes the scores; only the compiled one is a fused kernel.
    # dynamic=None: the second length seen compiles a dynamic-shape kernel, so batches padded to
    # different lengths do not recompile each time (and never hit the recompile limit, after which
    # Dynamo would run flex eagerly and materialize the scores).
    return torch.compile(flex_attention)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LayerMask, *,
              scale: float, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention [B, H, T, D] over q [B, H, T, D], k/v [B, KV, T, D] (grouped-query).

    mask None means plain causal; a boolean mask from `attention_mask`, or a BlockMask from
    `block_mask` (FlexAttention). `softcap` applies cap * tanh(scores / cap) to the scaled scores
    before masking (Gemma 2).
    """
    groups = q.shape[1] // k.shape[1]
    if isinstance(mask, BlockMask):
        score_mod = None
        if softcap is not None:
            cap = float(softcap)

            def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                          kv_idx: torch.Tensor) -> torch.Tensor:
                return cap * torch.tanh(score / cap)

        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=groups > 1)
    if softcap is None and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
    # Explicit masks: expand the kv heads, as SDPA's memory-efficient backend does not take enable_gqa.
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # SDPA has no softcap: scores in float32, capped, masked, softmaxed.
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        i = torch.arange(q.shape[2], device=q.device)
        mask = i[:, None] >= i[None, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def logit_softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap), in float32."""
    return cap * torch.tanh(logits.float() / cap)


def shift_targets(labels: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets aligned with the logits: targets[t] = labels[t + 1].

    The last position, and a position whose next token starts another document, get IGNORE_INDEX:
    a packed example never predicts the first token of the next one.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if documents is not None:
        crosses = F.pad(documents[:, 1:] != documents[:, :-1], (0, 1), value=False)
        targets = targets.masked_fill(crosses, IGNORE_INDEX)
    return targets


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, *, softcap: float | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy in float32 over targets != IGNORE_INDEX (targets already shifted, see shift_targets).

    Mean over the counted targets, or sum / num_items_in_batch when given (gradient accumulation
    over micro-batches of unequal target counts). `softcap` is the final-logit softcap (Gemma 2).
    """
    x = logits.float().flatten(0, -2)
    if softcap is not None:
        x = logit_softcap(x, softcap)
    total = F.cross_entropy(x, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        # clamp: a batch with nothing to predict gives 0, not 0/0
        num_items_in_batch = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / num_items_in_batch
