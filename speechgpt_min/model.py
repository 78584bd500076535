"""The language model: a LLaMA-style decoder-only transformer, with KV-cache generation.

SpeechGPT is LLaMA-7B with a larger vocabulary (text tokens + speech unit tokens). This file
holds the architecture, written to read top to bottom like the LLaMA paper (Touvron et al. 2023):

    token ids -> embedding -> n_layers x Block -> RMSNorm -> lm_head -> logits
    Block:  x = x + Attention(RMSNorm(x))      # rotary positions, grouped-query heads
            x = x + FeedForward(RMSNorm(x))    # SwiGLU

Module names mirror Hugging Face's LlamaForCausalLM, so our state_dict key
"layers.0.self_attn.q_proj.weight" is HF's "model.layers.0.self_attn.q_proj.weight", and
rotary embeddings use HF's half-split ("rotate_half") layout, so HF weights load unpermuted.

    cfg = LMConfig.from_preset("toy", vocab_size=1200)
    model = Transformer(cfg)
    logits = model(ids)                              # (B, T, vocab)
    logits, loss = model(ids, targets)               # targets -100 where masked
    out = model.generate(ids, 50, temperature=0.7, top_k=50, top_p=0.8, stop_ids=[2], generator=0)
    ids, pad_mask = left_pad([[1, 5, 9], [1, 7]])     # prompts of different lengths, one batch
    out = model.generate(ids, 50, temperature=0, pad_mask=pad_mask)
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .presets import config_from_preset

IGNORE_INDEX = -100  # targets with this value carry no loss (prompts, padding)


# ----------------------------------------------------------------------------- config

@dataclass
class LMConfig:
    vocab_size: int = 512          # set from the tokenizer: len(tokenizer)
    dim: int = 256                 # model width (HF: hidden_size)
    n_layers: int = 4
    n_heads: int = 4               # query heads
    n_kv_heads: int | None = None  # key/value heads; None -> n_heads (no grouping)
    ffn_dim: int | None = None     # SwiGLU hidden size; None -> LLaMA's 8/3 * dim rounded up
    max_seq_len: int = 1024        # longest sequence (rotary table size, KV cache limit)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False   # lm_head shares the embedding matrix

    def __post_init__(self):
        # Every derived size is computed here, once.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:  # LLaMA: 2/3 of 4*dim, rounded up to a multiple of 256 (16 when small)
            multiple = 256 if self.dim >= 1024 else 16
            self.ffn_dim = multiple * math.ceil(int(8 * self.dim / 3) / multiple)
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset (exact name), with any fields replaced, e.g. vocab_size=1200, dim=192;
        the result is checked as a whole (a changed dim must still divide into the heads)."""
        return config_from_preset(cls, LM_PRESETS, name, overrides)

    def to_dict(self):
        return asdict(self)


LM_PRESETS = {
    # Trains in minutes on 2 CPU cores: ~3M parameters plus the embeddings.
    "toy": dict(dim=256, n_layers=4, n_heads=4, ffn_dim=688, vocab_size=512, max_seq_len=1024,
                norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M: a real pretrained model small enough for a laptop.
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                         max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True),
    # LLaMA-7B, the base of SpeechGPT-7B (whose vocabulary grows to 33006).
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, vocab_size=32000, max_seq_len=2048,
                     norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False),
}


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 as LLaMA does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., dim) -> (..., dim)
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one kernel; the weight is applied after
        # casting back to x's dtype, as in HF, so bf16 results match too
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_tables(head_dim, max_seq_len, theta, device=None):
    """Rotation tables for every position: cos and signed sin, each (max_seq_len, head_dim), float32.

    Pair i of the half-split layout, (x[i], x[i + head_dim/2]), rotates by angle pos * theta^(-2i/head_dim):
        x[i]       <- x[i] cos - x[i + hd/2] sin
        x[i + hd/2] <- x[i + hd/2] cos + x[i] sin
    so cos repeats the angles' cosines in both halves, and sin is [-sin, +sin].
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float, device=device), inv_freq)  # (S, hd/2)
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)   # (S, hd)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)  # (S, hd)
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate x (B, n_heads, T, head_dim) by the tables cos/sin (T, head_dim) of `rope_tables`.

    Same numbers as HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1]: here the
    halves are swapped with one roll, [x2, x1], and the minus sign lives in the sin table.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim); the first `length` positions are filled.
    pad_mask (B, P), optional: True where the first P positions (a left-padded prompt, `left_pad`)
    hold padding, which no real token may attend to; None (or no True in it) means no padding.
    """

    def __init__(self, cfg, batch_size, max_len, dtype, device, pad_mask=None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KV cache of {max_len} positions exceeds the model's max_seq_len {cfg.max_seq_len}")
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0
        self.padding = None  # (B, max_len) True at padding, or None
        if pad_mask is not None and pad_mask.any():
            self.padding = F.pad(pad_mask.to(device=device, dtype=torch.bool), (0, max_len - pad_mask.shape[1]))

    def attention_mask(self, T):
        """Where T new queries after the `length` cached positions may look: (B, 1, T, length + T) bool.

        Causal, and a real token never sees padding. A pad query (its output is never used) sees the
        padding before it, so that no query sees nothing: some attention kernels give NaN for a fully
        masked row, which would reach real tokens through that pad's keys and values.
        """
        past, end = self.length, self.length + T
        causal = torch.ones(T, end, dtype=torch.bool, device=self.padding.device).tril(diagonal=past)  # (T, end)
        key_is_pad = self.padding[:, None, :end]          # (B, 1, end)
        query_is_pad = self.padding[:, past:end, None]    # (B, T, 1)
        return (causal & (~key_is_pad | query_is_pad))[:, None]  # (B, 1, T, end), broadcast over heads

    def update(self, layer, k, v):
        """Store k, v (B, n_kv, T, hd) after the filled positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # each (B, n_kv, end, hd)


class SharedPrefix:
    """The keys and values of a prefix that every row of a batch starts with (in training: BOS and
    the system prompt, 64 of an ASR example's ~110 tokens), computed once instead of once per row.

    It stands where a KVCache stands: the prefix runs first, alone (batch 1), and each layer records
    its keys and values, gradients attached; the rows' own tokens then attend to them, expanded over
    the batch. The loss and every gradient are those of running each row whole.
    """

    padding = None  # its rows are never padded (see KVCache)

    def __init__(self):
        self.k, self.v, self.length = {}, {}, 0

    def update(self, layer, k, v):
        """Record the prefix's k, v (1, n_kv, P, hd); then give each row's k, v after them."""
        if self.length == 0:
            self.k[layer], self.v[layer] = k, v
            return k, v
        B = k.shape[0]
        return (torch.cat([self.k[layer].expand(B, -1, -1, -1), k], dim=2),  # (B, n_kv, P + T, hd)
                torch.cat([self.v[layer].expand(B, -1, -1, -1), v], dim=2))


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query heads (n_kv_heads <= n_heads)."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None):
        """x (B, T, dim), cos/sin (T, head_dim) for these T positions -> (B, T, dim)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)  # each (B, n_kv, past + T, hd)
        if cache is not None and cache.padding is not None:  # a left-padded batch: causal, padding masked
            mask, causal = cache.attention_mask(T), False  # (B, 1, T, past + T)
        elif T == 1:       # one new token sees everything before it
            mask, causal = None, False
        elif past == 0:    # the queries are the whole sequence: plain causal mask
            mask, causal = None, True
        else:              # T new queries after `past` cached positions: query i sees keys <= past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)               # (B, T, nh * hd)
        return self.o_proj(y)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer layer: attention then feed-forward, each added to the residual."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None):  # (B, T, dim) -> (B, T, dim)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models have no lm_head: the logits reuse embed_tokens.weight.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~30% slower
        # The rotary tables are derived, not learned: not saved, and always real (device="cpu"),
        # even when the model is built on the "meta" device to load weights into it.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device="cpu")
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameter count (the tied embedding counted once); optionally without the embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face LLaMA directory (config.json + safetensors or pytorch_model.bin)."""
        from .weights import load_pretrained  # weights.py comes after model.py in the import chain
        return load_pretrained(path, dtype=dtype, device=device)

    def hidden_states(self, idx, cache=None):
        """idx (B, T) token ids -> final normed hidden states (B, T, dim).

        With a cache (a KVCache, or a SharedPrefix), the T tokens continue the cache's `length`
        positions, and are appended to it.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        x = self.embed_tokens(idx)  # (B, T, dim)
        cos = self.rope_cos[start:start + T].to(x.dtype)  # (T, hd)
        sin = self.rope_sin[start:start + T].to(x.dtype)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def logits(self, h):
        """Hidden states (..., dim) -> logits (..., vocab_size)."""
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed_tokens.weight)

    def forward(self, idx, targets=None, shared_prefix=0):
        """idx (B, T) -> logits (B, T, vocab_size).

        targets (B, T), optional: the token that should follow each position (the input shifted
        left by one), IGNORE_INDEX (-100) where no loss is wanted. Then returns (logits, loss), the
        loss being the mean cross-entropy over the unmasked positions (0 if all are masked).
        shared_prefix: P > 0 when every row starts with the same P tokens and no target lies among
        them: the prefix runs once (SharedPrefix), and logits (B, T - P, V) cover the rest.
        """
        if shared_prefix:
            prefix = SharedPrefix()
            self.hidden_states(idx[:1, :shared_prefix], prefix)  # its keys and values, once
            logits = self.logits(self.hidden_states(idx[:, shared_prefix:], prefix))  # (B, T - P, V)
            targets = targets[:, shared_prefix:] if targets is not None else None
        else:
            logits = self.logits(self.hidden_states(idx))  # (B, T, V)
        if targets is None:
            return logits
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        n_targets = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return logits, losses / n_targets

    # ------------------------------------------------------------------------- generation

    def decode_step(self, x, cache):
        """x (B, T) new tokens continuing the cache -> logits (B, V) of the token after them."""
        return self.logits(self.hidden_states(x, cache)[:, -1])  # only the last position

    @torch.no_grad()
    def stream(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), generator=None,
               compile=False, pad_mask=None):
        """Generate token by token: yields each new token as a (B,) tensor (see `generate`)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must be (batch, length>0) token ids, got shape {tuple(ids.shape)}")
        if pad_mask is not None and (pad_mask.shape != ids.shape or (pad_mask[:, 1:] > pad_mask[:, :-1]).any()):
            raise ValueError("pad_mask must have the shape of ids and mark padding on the left only (left_pad)")
        if isinstance(generator, int):
            generator = torch.Generator(device=ids.device).manual_seed(generator)
        stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
        B, T = ids.shape
        p = self.embed_tokens.weight
        cache = KVCache(self.config, B, min(T + max_new_tokens, self.config.max_seq_len), p.dtype, p.device, pad_mask)
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        # The prompt goes through in one pass; then one token at a time. With compile, torch.compile
        # traces that one-token step once (the cache length stays symbolic) and fuses each layer's
        # many small operations into a few kernels.
        one_token_step = torch.compile(self.decode_step, dynamic=True) if compile else self.decode_step
        step, x, last = self.decode_step, ids, None
        for _ in range(max_new_tokens):
            logits = step(x, cache)  # (B, V)
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            if last is not None:  # a finished row repeats its stop token
                nxt = torch.where(finished, last, nxt)
            yield nxt
            finished |= torch.isin(nxt, stop_ids)
            if finished.all():
                return
            step, x, last = one_token_step, nxt[:, None], nxt  # x: (B, 1)

    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_ids=(), generator=None,
                 compile=False, pad_mask=None):
        """Continue ids (B, T) by up to max_new_tokens tokens -> (B, T + n_new), prompt included.

        temperature 0: greedy (argmax). Otherwise sample from softmax(logits / temperature),
        restricted to the top_k most likely tokens and to the smallest set whose probability
        reaches top_p (nucleus). Stops once every row has produced one of stop_ids (that token is
        kept; rows that stopped earlier repeat theirs). generator: a torch.Generator or an int seed.
        compile: decode with torch.compile (needs a C++ compiler on CPU; the first call compiles for
        tens of seconds, later calls on the same model reuse the code): pays off for long generation
        from small models, whose time goes to launching many small operations.
        pad_mask (B, T): True at padding, for prompts of different lengths left-padded into one batch
        (`left_pad`). Every row keeps positions 0..T-1, pads included: rotary attention depends only
        on the distance between positions, so each real token sees the same distances as alone, and
        with the pad keys masked out each row's logits are those it gets alone (up to float rounding):
        greedy decoding continues each row as it would alone.
        """
        new = list(self.stream(ids, max_new_tokens, temperature, top_k, top_p, stop_ids, generator, compile,
                               pad_mask))
        return torch.cat([ids] + [t[:, None] for t in new], dim=1) if new else ids.clone()


def left_pad(sequences, pad_id=0, device=None):
    """Token id lists of different lengths -> ids (B, T) and pad_mask (B, T), T the longest length:
    each list right-aligned after pad_id tokens, pad_mask True at those; for generate(..., pad_mask=...)."""
    T = max(len(seq) for seq in sequences)
    ids = torch.tensor([[pad_id] * (T - len(seq)) + list(seq) for seq in sequences], device=device)
    pad_mask = torch.tensor([[True] * (T - len(seq)) + [False] * len(seq) for seq in sequences], device=device)
    return ids, pad_mask


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, V) -> (B,) ids. temperature 0 means argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # the first token is never dropped
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
