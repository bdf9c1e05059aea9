"""U-Nets that predict eps from (x_t, t). Images are NHWC: [B, H, W, C].

* `SimpleUNet`: the seed notebook's network (3x3 convs 64/128/256, ReLU,
  stride-2 downsampling, ConvTranspose upsampling, skip connections, per-level
  time projections); 2,755,201 parameters for one channel, as in PyTorch.
* `UNet`: the tutorial's residual U-Net (GroupNorm, SiLU, dropout, time
  projection per block, self-attention at chosen levels), configurable width,
  channel multipliers and blocks per level.

Presets are `functools.partial`s; `make_model(name)` looks them up.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nnbase.conv import Conv, ConvTranspose2x


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding of the seeds: [B] -> [B, dim], sin then cos halves.

  Frequencies are exp(-log(max_period) * i / (half - 1)), i = 0..half-1.
  """
  if dim < 4 or dim % 2:
    raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def check_image_shape(shape: Sequence[int], factor: int) -> None:
  """Raises ValueError unless H and W of an NHWC shape are divisible by factor."""
  if len(shape) != 4:
    raise ValueError(f"expected images [B, H, W, C], got shape {tuple(shape)}")
  _, h, w, _ = shape
  if h % factor or w % factor:
    raise ValueError(
      f"image size {h}x{w} is not divisible by {factor}, the U-Net's total "
      "downsampling factor; choose another size or a model with fewer levels"
    )


def label_embedding(
  num_classes: int, dim: int, y: Optional[jax.Array], batch: int, dtype: Any
) -> Optional[jax.Array]:
  """Class embedding [B, dim] for a class-conditional U-Net, or None.

  Labels y [B] lie in 0..num_classes, where num_classes is the null label
  (unconditional; classifier-free guidance trains with it and samples with
  it). y=None means the null label for every example. The table has
  num_classes + 1 rows and starts at zero, so a fresh conditional model
  behaves like an unconditional one.
  """
  if num_classes == 0:
    if y is not None:
      raise ValueError(
        "labels were given to an unconditional U-Net; build it with "
        "num_classes > 0 to condition on classes"
      )
    return None
  if y is None:
    y = jnp.full((batch,), num_classes, jnp.int32)
  y = jnp.asarray(y)
  if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels must be integers of shape ({batch},), got {y.dtype} {y.shape}")
  table = nn.Embed(
    num_classes + 1, dim, embedding_init=nn.initializers.zeros, dtype=dtype, name="label_embedding"
  )
  return table(y)


class SimpleUNet(nn.Module):
  """The seed notebook's SimpleUNet.

  Attributes:
    channels: widths of the three levels (seed: 64, 128, 256).
    time_dim: sinusoidal embedding and time-MLP width (seed: 256).
    out_channels: output channels; None means the input's.
    num_classes: 0 (the seed's unconditional net) or the number of classes:
      a label embedding (null label = num_classes) is added to the time
      embedding, see `label_embedding`.
    emb_every_block: also add a projection of the time (+ label) embedding
      after the two bottleneck convs and the two decoder convs, so it
      reaches every block, encoder and decoder. The seed adds it only in the
      three encoder convs. None: on for class-conditional nets, off for the
      seed's unconditional one (whose 2,755,201 parameters stay unchanged).
    gemm_conv: GEMM/Winograd convolutions (same maths); None: on CPU, for
      layers with >= 32 channels.
    dtype: computation dtype; parameters stay float32.
  """

  channels: Sequence[int] = (64, 128, 256)
  time_dim: int = 256
  out_channels: Optional[int] = None
  num_classes: int = 0
  emb_every_block: Optional[bool] = None
  gemm_conv: Optional[bool] = None
  dtype: Any = jnp.float32

  downsample_factor = 4

  @nn.compact
  def __call__(self, x, t, train: bool = False, y=None):
    """x: [B, H, W, C], t: [B] int or float, y: [B] labels or None
    -> eps [B, H, W, out_channels]."""
    check_image_shape(x.shape, self.downsample_factor)
    c1, c2, c3 = self.channels
    conv = functools.partial(Conv, gemm_conv=self.gemm_conv, dtype=self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    down = functools.partial(conv, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    up = functools.partial(ConvTranspose2x, gemm_conv=self.gemm_conv, dtype=self.dtype)
    out_ch = self.out_channels or x.shape[-1]
    x = x.astype(self.dtype)

    emb = dense(self.time_dim, name="time_mlp")(
      timestep_embedding(t, self.time_dim).astype(self.dtype)
    )
    label = label_embedding(self.num_classes, self.time_dim, y, x.shape[0], self.dtype)
    emb = nn.relu(emb if label is None else emb + label)
    proj = lambda c, name: dense(c, name=name)(emb)[:, None, None, :]
    every = self.num_classes > 0 if self.emb_every_block is None else self.emb_every_block
    more = proj if every else (lambda c, name: None)

    # relu(conv(h) + bias + projection), the last two steps fused into the
    # convolution on the GEMM path (nnbase.conv.conv_gemm_relu).
    h1 = conv(c1, name="conv1")(x, proj(c1, "time_proj1"), relu=True)
    h2 = down(c2, name="conv2")(h1, proj(c2, "time_proj2"), relu=True)
    h3 = down(c3, name="conv3")(h2, proj(c3, "time_proj3"), relu=True)
    h = conv(c3, name="bottleneck1")(h3, more(c3, "time_proj_mid1"), relu=True)
    h = conv(c3, name="bottleneck2")(h, more(c3, "time_proj_mid2"), relu=True)
    h = up(c2, name="up1")(h)
    h = conv(c2, name="conv4")(jnp.concatenate([h, h2], axis=-1), more(c2, "time_proj4"), relu=True)
    h = up(c1, name="up2")(h)
    h = conv(c1, name="conv5")(jnp.concatenate([h, h1], axis=-1), more(c1, "time_proj5"), relu=True)
    return Conv(out_ch, (1, 1), gemm_conv=self.gemm_conv, dtype=self.dtype, name="out")(h)


class ResBlock(nn.Module):
  """conv-GN-SiLU, + time projection, conv-GN-SiLU-dropout, + shortcut (tutorial 3.6.1)."""

  features: int
  dropout: float = 0.1
  num_groups: int = 8
  gemm_conv: Optional[bool] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    conv = functools.partial(Conv, gemm_conv=self.gemm_conv, dtype=self.dtype)
    norm = functools.partial(nn.GroupNorm, num_groups=self.num_groups, dtype=self.dtype)
    h = nn.silu(norm()(conv(self.features)(x)))
    h = h + nn.Dense(self.features, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
    h = nn.silu(norm()(conv(self.features)(h)))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), name="shortcut")(x)
    return h + x


def heads_first_attention(query, key, value, mask=None, dropout_rate: float = 0.0, dtype=None):
  """softmax(q k^T / sqrt(d)) v, as `flax.linen.dot_product_attention`:
  [B, L, H, D] x3 -> [B, L, H, D]; `mask` broadcasts to [B, H, Lq, Lk].

  The products run on [B, H, L, D] (heads next to the batch), and the
  softmax in float32. XLA:CPU runs flax's [B, L, H, D] einsums through
  layout copies: one forward of the `test` U-Net's 14x14 attention (64
  images, 2 heads of 8) took 33 ms that way and 6 ms this way, with the same
  numbers (the gradient takes about as long either way).
  """
  if dropout_rate > 0.0:
    raise ValueError("heads_first_attention has no attention dropout; use dropout_rate=0")
  dtype = dtype or query.dtype
  q, k, v = (jnp.swapaxes(a.astype(dtype), 1, 2) for a in (query, key, value))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(dtype), k)
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, with a residual."""

  num_heads: int = 4
  num_groups: int = 8
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention channels {c} not divisible by num_heads {self.num_heads}")
    h = nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(x).reshape(b, hh * ww, c)
    h = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, dtype=self.dtype, attention_fn=heads_first_attention
    )(h, h)
    return x + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
  """Residual U-Net of the tutorial (seed 004, 3.6.1).

  Attributes:
    base_channels: width of the first level.
    channel_mults: width multiplier per level; len - 1 downsamplings by 2.
    num_res_blocks: residual blocks per level on the way down (one more up).
    attention_levels: levels (0 = full resolution) that get self-attention
      after each residual block; the middle always has one.
    dropout: dropout rate inside residual blocks (active when train=True).
    num_groups: GroupNorm groups.
    num_heads: attention heads.
    upsample: "nearest" (nearest-neighbour then 3x3 conv) or
      "conv_transpose" (4x4 stride-2 transposed conv, as in the tutorial).
    out_channels: output channels; None means the input's.
    num_classes: 0 (unconditional) or the number of classes: a label
      embedding (null label = num_classes) is added to the time embedding,
      see `label_embedding`.
    gemm_conv: GEMM/Winograd convolutions (same maths); None: on CPU, for
      layers with >= 32 channels.
    dtype: computation dtype; parameters stay float32.
  """

  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = ()
  dropout: float = 0.1
  num_groups: int = 8
  num_heads: int = 4
  upsample: str = "nearest"
  out_channels: Optional[int] = None
  num_classes: int = 0
  gemm_conv: Optional[bool] = None
  dtype: Any = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.channel_mults) - 1)

  @nn.compact
  def __call__(self, x, t, train: bool = False, y=None):
    """x: [B, H, W, C], t: [B], y: [B] labels or None -> eps [B, H, W, out_channels]."""
    check_image_shape(x.shape, self.downsample_factor)
    if self.upsample not in ("nearest", "conv_transpose"):
      raise ValueError(f"upsample must be 'nearest' or 'conv_transpose', got {self.upsample!r}")
    conv = functools.partial(Conv, gemm_conv=self.gemm_conv, dtype=self.dtype)
    block = functools.partial(
      ResBlock,
      dropout=self.dropout,
      num_groups=self.num_groups,
      gemm_conv=self.gemm_conv,
      dtype=self.dtype,
    )
    attn = functools.partial(
      AttnBlock, num_heads=self.num_heads, num_groups=self.num_groups, dtype=self.dtype
    )
    out_ch = self.out_channels or x.shape[-1]
    ch = self.base_channels
    emb_dim = 4 * ch
    emb = timestep_embedding(t, ch).astype(self.dtype)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(nn.gelu(nn.Dense(emb_dim, dtype=self.dtype)(emb)))
    label = label_embedding(self.num_classes, emb_dim, y, x.shape[0], self.dtype)
    emb = emb if label is None else emb + label

    h = conv(ch)(x.astype(self.dtype))
    skips = [h]
    levels = len(self.channel_mults)
    for level, mult in enumerate(self.channel_mults):
      for _ in range(self.num_res_blocks):
        h = block(ch * mult)(h, emb, train)
        if level in self.attention_levels:
          h = attn()(h)
        skips.append(h)
      if level < levels - 1:
        h = nn.Conv(
          h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype
        )(h)
        skips.append(h)

    h = block(h.shape[-1])(h, emb, train)
    h = attn()(h)
    h = block(h.shape[-1])(h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mults))):
      for _ in range(self.num_res_blocks + 1):
        h = block(ch * mult)(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if level in self.attention_levels:
          h = attn()(h)
      if level > 0:
        c = h.shape[-1]
        if self.upsample == "nearest":
          b, hh, ww, _ = h.shape
          h = conv(c)(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
        else:
          h = ConvTranspose2x(c, gemm_conv=self.gemm_conv, dtype=self.dtype)(h)

    h = nn.silu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(h))
    return conv(out_ch)(h)


PRESETS = {
  # The seed notebook's network (001): 2,755,201 parameters for 1 channel.
  "simple": functools.partial(SimpleUNet),
  # Half-width SimpleUNet, for CPU runs.
  "simple_half": functools.partial(SimpleUNet, channels=(32, 64, 128), time_dim=128),
  # The same with the time embedding added in every block (734,881 parameters).
  "simple_half_emb": functools.partial(
    SimpleUNet, channels=(32, 64, 128), time_dim=128, emb_every_block=True
  ),
  # The tutorial's residual sizes (seed 004, 3.6.1).
  "tiny": functools.partial(UNet, base_channels=16, channel_mults=(1, 2, 2), attention_levels=(2,)),
  "small": functools.partial(
    UNet, base_channels=32, channel_mults=(1, 2, 2, 4), attention_levels=(2,)
  ),
  "base": functools.partial(
    UNet, base_channels=64, channel_mults=(1, 2, 4, 8), attention_levels=(2,)
  ),
  # A very small residual net for unit tests and the smoke job.
  "test": functools.partial(
    UNet,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    num_groups=4,
    num_heads=2,
    dropout=0.0,
  ),
}


def make_model(preset: str, **overrides) -> nn.Module:
  """Returns the U-Net preset `preset` with field overrides (e.g. dtype)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
  n = overrides.get("num_classes", 0)
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
    raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {n!r}")
  return PRESETS[preset](**overrides)
