"""Small transformers in plain PyTorch: a ViT, a Swin (window attention, shifted windows, relative
position bias), a BERT-style encoder, a GPT-style decoder and a LLaMA-style decoder, at test sizes (hidden 32, MLP 80, 2 layers, 4 heads of 8 features, 8 tokens,
vocab 50). `build(mlp=..., heads=...)` makes the same architecture with fewer MLP neurons or fewer
heads (of the same head size): what a model with those removed must equal.

Every MLP exposes `expand` (the Linears that produce its hidden neurons: fc1, or gate and up), every
attention `head_rows(h)` (the q, k, v rows that make head h), `value_rows(h)` and `output_columns(h)`
(what makes head h's contribution), so that tests can zero whole neurons and whole heads without
knowing the model.

    >>> from onnxprune.models.transformers import TRANSFORMERS
    >>> spec = TRANSFORMERS["gpt"]
    >>> model = spec.build(seed=0)             # eval mode, seeded
    >>> y = model(*spec.example_input(seed=0))  # (1, 8, 50) logits
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["TransformerSpec", "TRANSFORMERS", "HEADS", "mlps", "attentions", "zero_mlp_neurons", "zero_heads",
           "zero_head_contributions"]

DIM, HEADS, LAYERS, VOCAB, SEQ = 32, 4, 2, 50, 8
HEAD_DIM = DIM // HEADS
MLP = 80  # hidden neurons: 80 and 40 (half) differ from every other matrix width here (32, 16, 96, 50, 10)


# --- building blocks ------------------------------------------------------------------------

class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    @property
    def expand(self) -> list[nn.Linear]:
        return [self.fc1]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free as in LLaMA."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    @property
    def expand(self) -> list[nn.Linear]:
        return [self.gate, self.up]

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class RMSNorm(nn.Module):
    """Written out in tensor ops (no fused op): x / sqrt(mean(x²) + eps) · weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def split_heads(x, heads: int):
    """[B, N, h·d] -> [B, h, N, d]"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x):
    """[B, h, N, d] -> [B, N, h·d]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(q, k, v, bias=None):
    """softmax(q·kᵀ/√d + bias)·v, written out (no fused SDPA) so exporters emit the two MatMuls."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


class HeadMasks:
    """Where head h lives in the weights, for attentions with `heads` query heads of `d` features
    (`kv_group` query heads per k / v head) and an output projection `out_proj`."""
    kv_group = 1

    def value_rows(self, h: int):
        """The v rows head h reads (in GQA those of its k / v head, shared by the whole group)."""
        return self.head_rows(h)[2:]

    def output_columns(self, h: int):
        d = self.out_proj.in_features // self.heads
        return [(self.out_proj, h * d, d)]


class FusedQKVAttention(HeadMasks, nn.Module):
    """ViT's: one Linear, Reshape [B, N, 3, h, d], permute (2, 0, 3, 1, 4), q, k, v = qkv[0..2]."""

    def __init__(self, dim: int, heads: int, d: int = HEAD_DIM):
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv, self.proj = nn.Linear(dim, 3 * heads * d), nn.Linear(heads * d, dim)
        self.out_proj = self.proj

    def head_rows(self, h: int):
        d = self.d
        return [(self.qkv, part * self.heads * d + h * d, d) for part in range(3)]

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return self.proj(merge_heads(attend(q, k, v)))


class CausalSplitAttention(HeadMasks, nn.Module):
    """GPT-2's: one Linear split into q, k, v along the features; a causal mask."""

    def __init__(self, dim: int, heads: int, seq: int, d: int = HEAD_DIM):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * heads * d), nn.Linear(heads * d, dim)
        self.out_proj = self.proj
        self.register_buffer("causal", torch.full((seq, seq), float("-inf")).triu(1), persistent=False)

    def head_rows(self, h: int):
        width = self.proj.in_features
        d = width // self.heads
        return [(self.qkv, part * width + h * d, d) for part in range(3)]

    def forward(self, x):
        n = x.shape[1]
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).split(self.proj.in_features, dim=2))
        return self.proj(merge_heads(attend(q, k, v, self.causal[:n, :n])))


class SeparateQKVAttention(HeadMasks, nn.Module):
    """BERT's: three Linears, an additive attention-mask bias."""

    def __init__(self, dim: int, heads: int, d: int = HEAD_DIM):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, heads * d) for _ in range(3))
        self.out = self.out_proj = nn.Linear(heads * d, dim)

    def head_rows(self, h: int):
        d = self.out.in_features // self.heads
        return [(lin, h * d, d) for lin in (self.q, self.k, self.v)]

    def forward(self, x, mask_bias):
        q, k, v = (split_heads(lin(x), self.heads) for lin in (self.q, self.k, self.v))
        return self.out(merge_heads(attend(q, k, v, mask_bias)))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GroupedQueryAttention(HeadMasks, nn.Module):
    """LLaMA's: bias-free q, k, v, o; rotary position embedding on q and k; `kv_heads` < `heads`
    k / v heads, each repeated to `heads // kv_heads` query heads; causal."""

    def __init__(self, dim: int, heads: int, kv_heads: int, seq: int, d: int = HEAD_DIM):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.kv_group = heads // kv_heads
        self.q = nn.Linear(dim, heads * d, bias=False)
        self.k = nn.Linear(dim, kv_heads * d, bias=False)
        self.v = nn.Linear(dim, kv_heads * d, bias=False)
        self.o = self.out_proj = nn.Linear(heads * d, dim, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
        angles = torch.outer(torch.arange(seq).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [seq, d]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("causal", torch.full((seq, seq), float("-inf")).triu(1), persistent=False)

    def head_rows(self, h: int):
        """Query head h and the k / v head it reads (zeroing a k/v head touches all its queries)."""
        d = self.o.in_features // self.heads
        kv = h // (self.heads // self.kv_heads)
        return [(self.q, h * d, d), (self.k, kv * d, d), (self.v, kv * d, d)]

    def repeat_kv(self, x):
        b, h, n, d = x.shape
        rep = self.heads // self.kv_heads
        return x[:, :, None].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)

    def forward(self, x):
        n = x.shape[1]
        cos, sin = self.cos[:n], self.sin[:n]
        q, k, v = split_heads(self.q(x), self.heads), split_heads(self.k(x), self.kv_heads), split_heads(self.v(x), self.kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        return self.o(merge_heads(attend(q, self.repeat_kv(k), self.repeat_kv(v), self.causal[:n, :n])))


# --- the four models ------------------------------------------------------------------------

class PreNormBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)) (ViT, GPT, LLaMA)."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm(), attn, norm(), mlp

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PostNormBlock(nn.Module):
    """norm1(x + attn(x)), then norm2(x + mlp(x)) (BERT)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.attn, self.norm1 = SeparateQKVAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp, self.norm2 = GeluMLP(dim, mlp), nn.LayerNorm(dim)

    def forward(self, x, mask_bias):
        x = self.norm1(x + self.attn(x, mask_bias))
        return self.norm2(x + self.mlp(x))


class WindowAttention(HeadMasks, nn.Module):
    """Swin's: attention inside w×w windows of a [B, H, W, C] map (window partition and reverse are
    reshapes and a permute), fused qkv, a learned relative-position bias table [(2w-1)², h] gathered
    by a constant index to [h, w², w²]; `shift` rolls the map by w/2 first and masks the attention
    between tokens that the roll brought together (shifted windows)."""

    def __init__(self, dim: int, heads: int, window: int, size: int, shift: bool, d: int = HEAD_DIM):
        super().__init__()
        self.heads, self.d, self.window, self.shift = heads, d, window, window // 2 if shift else 0
        self.qkv, self.proj = nn.Linear(dim, 3 * heads * d), nn.Linear(heads * d, dim)
        self.out_proj = self.proj
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        region = torch.zeros(size, size)
        if self.shift:
            cuts = (slice(0, -window), slice(-window, -self.shift), slice(-self.shift, None))
            for k, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
                region[a, b] = k
        regions = self.partition(region[None, :, :, None]).squeeze(-1)  # [nW, w²]
        mask = (regions[:, :, None] != regions[:, None, :]).float() * -1e4
        self.register_buffer("mask", mask[:, None], persistent=False)  # [nW, 1, w², w²]

    def head_rows(self, h: int):
        return [(self.qkv, part * self.heads * self.d + h * self.d, self.d) for part in range(3)]

    def partition(self, x):
        """[B, H, W, C] -> [B·nW, w², C]"""
        b, hh, ww, c = x.shape
        w = self.window
        return x.view(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)

    def forward(self, x):
        b, hh, ww, c = x.shape
        w = self.window
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        t = self.partition(x)
        n = t.shape[1]
        qkv = self.qkv(t).reshape(-1, n, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # [h, w², w²]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d) + bias
        windows = scores.shape[0] // b
        scores = (scores.view(b, windows, self.heads, n, n) + self.mask).view(-1, self.heads, n, n)
        out = self.proj(merge_heads(scores.softmax(dim=-1) @ v))
        out = out.view(b, hh // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        return torch.roll(out, (self.shift, self.shift), dims=(1, 2)) if self.shift else out


class Swin(nn.Module):
    """Patch embedding to a [B, 8, 8, C] map, a window-attention block and a shifted one (windows
    4×4), mean pool, classifier."""

    def __init__(self, mlp: int, image: int = 16, patch: int = 2, dim: int = DIM, heads: int = HEADS,
                 window: int = 4, num_classes: int = 10):
        super().__init__()
        size = image // patch
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(PreNormBlock(WindowAttention(dim, heads, window, size, shift), GeluMLP(dim, mlp),
                                                 lambda: nn.LayerNorm(dim)) for shift in (False, True))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, image):
        x = self.patch(image).permute(0, 2, 3, 1)  # [B, H, W, C]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


class ViT(nn.Module):
    def __init__(self, mlp: int, image: int = 16, patch: int = 4, dim: int = DIM, heads: int = HEADS,
                 layers: int = LAYERS, num_classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.5)
        self.blocks = nn.ModuleList(PreNormBlock(FusedQKVAttention(dim, heads), GeluMLP(dim, mlp),
                                                 lambda: nn.LayerNorm(dim)) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, image):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class BertEncoder(nn.Module):
    def __init__(self, mlp: int, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS, vocab: int = VOCAB,
                 seq: int = SEQ):
        super().__init__()
        self.tok, self.pos, self.norm = nn.Embedding(vocab, dim), nn.Embedding(seq, dim), nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(PostNormBlock(dim, heads, mlp) for _ in range(layers))

    def forward(self, ids, attention_mask):
        x = self.norm(self.tok(ids) + self.pos.weight[: ids.shape[1]])
        # 0 in attention_mask = padding: a large negative bias on those keys
        mask_bias = (attention_mask == 0).to(x.dtype)[:, None, None, :] * -1e4
        for block in self.blocks:
            x = block(x, mask_bias)
        return x


class GPT(nn.Module):
    def __init__(self, mlp: int, dim: int = DIM, heads: int = HEADS, layers: int = LAYERS, vocab: int = VOCAB,
                 seq: int = SEQ):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(PreNormBlock(CausalSplitAttention(dim, heads, seq), GeluMLP(dim, mlp),
                                                 lambda: nn.LayerNorm(dim)) for _ in range(layers))
        self.norm, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)  # untied

    def forward(self, ids):
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class Llama(nn.Module):
    def __init__(self, mlp: int, dim: int = DIM, heads: int = HEADS, kv_group: int = 2, layers: int = LAYERS,
                 vocab: int = VOCAB, seq: int = SEQ):
        super().__init__()
        kv_heads = heads // kv_group  # (query heads per k / v head: 2)
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(PreNormBlock(GroupedQueryAttention(dim, heads, kv_heads, seq), SwiGLU(dim, mlp),
                                                 lambda: RMSNorm(dim)) for _ in range(layers))
        self.norm, self.lm_head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


# --- the registry -------------------------------------------------------------------------

def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Norm weights U[0.5, 1.5] and LayerNorm biases N(0, 0.2): no identity affine hides a bug."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, RMSNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)


def _ids(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, SEQ), generator=gen)


def _bert_inputs(gen: torch.Generator):
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    mask[:, -2:] = 0  # the last two tokens are padding
    return _ids(gen), mask


@dataclass(frozen=True)
class TransformerSpec:
    name: str
    factory: Callable[..., nn.Module]       # factory(mlp=hidden width) -> nn.Module
    make_inputs: Callable[[torch.Generator], tuple]
    mlp: int                                 # default MLP hidden width (even)

    def build(self, seed: int = 0, mlp: int | None = None, heads: int = HEADS) -> nn.Module:
        """Seeded and deterministic, in eval mode; `mlp` changes only the MLP hidden width, `heads`
        only the number of attention heads (each HEAD_DIM wide; LLaMA keeps 2 query heads per k / v head)."""
        torch.manual_seed(seed)
        model = self.factory(mlp=self.mlp if mlp is None else mlp, heads=heads).eval()
        _randomize_norms(model, torch.Generator().manual_seed(seed + 1))
        return model

    def example_input(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        out = self.make_inputs(gen)
        return out if isinstance(out, tuple) else (out,)


TRANSFORMERS: dict[str, TransformerSpec] = {
    s.name: s
    for s in (
        TransformerSpec("vit", ViT, lambda gen: torch.randn((1, 3, 16, 16), generator=gen), MLP),
        TransformerSpec("swin", Swin, lambda gen: torch.randn((1, 3, 16, 16), generator=gen), MLP),
        TransformerSpec("bert", BertEncoder, _bert_inputs, MLP),
        TransformerSpec("gpt", GPT, _ids, MLP),
        TransformerSpec("llama", Llama, _ids, MLP),
    )
}


# --- masks (weights only: biases stay, so zeroed neurons carry real constants) -------------------

def mlps(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (GeluMLP, SwiGLU))]


def attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "head_rows")]


@torch.no_grad()
def zero_mlp_neurons(model: nn.Module, fraction: float = 0.5, seed: int = 0) -> int:
    """Zero the weight rows of a random `fraction` of every MLP's hidden neurons (in fc1, or in both
    gate and up); returns the number of neurons zeroed."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for mlp in mlps(model):
        hidden = mlp.expand[0].out_features
        idx = torch.randperm(hidden, generator=gen)[: int(hidden * fraction)]
        for lin in mlp.expand:
            lin.weight[idx] = 0
        total += len(idx)
    return total


@torch.no_grad()
def zero_heads(model: nn.Module, heads=(0,)) -> None:
    """Zero the q, k and v weight rows of the given heads in every attention (biases stay)."""
    for attn in attentions(model):
        for h in heads:
            for lin, start, size in attn.head_rows(h):
                lin.weight[start: start + size] = 0


@torch.no_grad()
def zero_head_contributions(model: nn.Module, fraction: float = 0.5, seed: int = 0, part: str = "values") -> int:
    """Make a random `fraction` of every attention's heads contribute an input-independent constant:
    `part="values"` zeroes their v weight rows (biases stay: the head's output is its v bias),
    `part="outputs"` their output projection's input columns. In grouped-query attention whole groups
    (a k / v head and all its query heads) are picked. Returns the number of query heads made dead."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for attn in attentions(model):
        groups = attn.heads // attn.kv_group
        for g in torch.randperm(groups, generator=gen)[: int(groups * fraction)].tolist():
            for h in range(g * attn.kv_group, (g + 1) * attn.kv_group):
                for lin, start, size in (attn.value_rows(h) if part == "values" else attn.output_columns(h)):
                    if part == "values":
                        lin.weight[start: start + size] = 0
                    else:
                        lin.weight[:, start: start + size] = 0
                total += 1
    return total
