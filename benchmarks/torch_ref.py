"""The seeds' PyTorch models and loops, timed beside ours by `benchmarks.run`.

SimpleUNet, its DDPM train step (seed 001) and the MNIST VAE epoch (seed 000),
written as in the notebooks. torch is optional: `available()` is False when
it is missing and the benchmark prints a message instead of ratios.

`python -m benchmarks.torch_ref` times them alone, without JAX, in the
environment it is started in (so with and without `GLIBC_TUNABLES` and the
allocation cache in LD_PRELOAD, the settings `benchmarks.run` gives both
frameworks, it shows what they do to PyTorch): medians of `--rounds` rounds,
about 15 s each.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import benchmarks

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:  # optional dependency
  torch = None


def available() -> bool:
  return torch is not None


if torch is not None:

  class SinusoidalPositionEmbedding(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.dim = dim

    def forward(self, t):
      half = self.dim // 2
      emb = math.log(10000) / (half - 1)
      emb = torch.exp(torch.arange(half, device=t.device) * -emb)
      emb = t[:, None] * emb[None, :]
      return torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)

  class SimpleUNet(nn.Module):
    """Seed 001's SimpleUNet (2,755,201 parameters for one channel)."""

    def __init__(self, in_channels=1, time_dim=256):
      super().__init__()
      self.time_mlp = nn.Sequential(
        SinusoidalPositionEmbedding(time_dim), nn.Linear(time_dim, time_dim), nn.ReLU()
      )
      self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
      self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
      self.conv3 = nn.Conv2d(128, 256, 3, stride=2, padding=1)
      self.time_proj1 = nn.Linear(time_dim, 64)
      self.time_proj2 = nn.Linear(time_dim, 128)
      self.time_proj3 = nn.Linear(time_dim, 256)
      self.bottleneck = nn.Sequential(
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()
      )
      self.up1 = nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1)
      self.conv4 = nn.Conv2d(256, 128, 3, padding=1)
      self.up2 = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)
      self.conv5 = nn.Conv2d(128, 64, 3, padding=1)
      self.out = nn.Conv2d(64, in_channels, 1)

    def forward(self, x, t):
      t_emb = self.time_mlp(t.float())
      h1 = F.relu(self.conv1(x) + self.time_proj1(t_emb)[:, :, None, None])
      h2 = F.relu(self.conv2(h1) + self.time_proj2(t_emb)[:, :, None, None])
      h3 = F.relu(self.conv3(h2) + self.time_proj3(t_emb)[:, :, None, None])
      h = self.bottleneck(h3)
      h = F.relu(self.conv4(torch.cat([self.up1(h), h2], dim=1)))
      h = F.relu(self.conv5(torch.cat([self.up2(h), h1], dim=1)))
      return self.out(h)

  class VAE(nn.Module):
    """Seed 000's MLP VAE, 784-400-20."""

    def __init__(self, input_dim=784, hidden_dim=400, latent_dim=20):
      super().__init__()
      self.fc1 = nn.Linear(input_dim, hidden_dim)
      self.fc_mu = nn.Linear(hidden_dim, latent_dim)
      self.fc_logvar = nn.Linear(hidden_dim, latent_dim)
      self.fc3 = nn.Linear(latent_dim, hidden_dim)
      self.fc4 = nn.Linear(hidden_dim, input_dim)

    def forward(self, x):
      h = F.relu(self.fc1(x.view(-1, 784)))
      mu, logvar = self.fc_mu(h), self.fc_logvar(h)
      z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
      return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def _linear_alphas_cumprod(T=1000):
  betas = torch.linspace(1e-4, 0.02, T)
  return torch.cumprod(1 - betas, 0)


def make_train_round(batch: int = 128, warmup: int = 2):
  """Seed 001's train step (random t, q_sample, MSE, Adam 1e-3), built once:
  returns `round(iters) -> images/s` (warmed up)."""
  torch.manual_seed(0)
  model = SimpleUNet()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  ab = _linear_alphas_cumprod()
  x0 = torch.rand(batch, 1, 28, 28) * 2 - 1

  def step():
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    a = ab[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    loss = F.mse_loss(model(x_t, t), noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  for _ in range(warmup):
    step()

  def round_(iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
      step()
    return batch * iters / (time.perf_counter() - t0)

  return round_


def make_forward_round(batch: int = 64, warmup: int = 3):
  """One sampler step's network call (no grad) on `batch` images, built once:
  returns `round(iters) -> images/s`."""
  torch.manual_seed(0)
  model = SimpleUNet().eval()
  x = torch.randn(batch, 1, 28, 28)
  t = torch.full((batch,), 500)
  with torch.no_grad():
    for _ in range(warmup):
      model(x, t)

  def round_(iters: int) -> float:
    with torch.no_grad():
      t0 = time.perf_counter()
      for _ in range(iters):
        model(x, t)
    return batch * iters / (time.perf_counter() - t0)

  return round_


def make_ancestral_round(batch: int = 64, T: int = 1000):
  """The seed's sampling loop (Algorithm 2, beta variance) for `batch` images
  over all T steps: returns `round() -> seconds`."""
  torch.manual_seed(0)
  model = SimpleUNet().eval()
  betas = torch.linspace(1e-4, 0.02, T)
  alphas = 1 - betas
  ab = torch.cumprod(alphas, 0)

  def round_() -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
      x = torch.randn(batch, 1, 28, 28)
      for i in reversed(range(T)):
        t = torch.full((batch,), i)
        eps = model(x, t)
        mean = (x - betas[i] / (1 - ab[i]).sqrt() * eps) / alphas[i].sqrt()
        x = mean + (betas[i].sqrt() * torch.randn_like(x) if i > 0 else 0)
    return time.perf_counter() - t0

  return round_


def ddpm_train_throughput(batch: int = 128, iters: int = 10, warmup: int = 2) -> dict:
  """Seed 001's train step: images/s over `iters` steps after `warmup`."""
  ips = make_train_round(batch, warmup)(iters)
  return {"images_per_sec": ips, "step_ms": 1e3 * batch / ips}


def forward_throughput(batch: int = 64, iters: int = 20, warmup: int = 3) -> dict:
  """One sampler step's network call (no grad) on `batch` images: images/s."""
  ips = make_forward_round(batch, warmup)(iters)
  return {"images_per_sec": ips, "forward_ms": 1e3 * batch / ips}


def _vae_step(model, opt, x):
  opt.zero_grad()
  recon, mu, logvar = model(x)
  bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
  kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
  loss = bce + kld
  loss.backward()
  opt.step()
  return loss


def vae_epoch_seconds(images_u8, batch: int = 128) -> float:
  """Seed 000's model and step for one epoch over uint8 images [N, 28, 28, 1]
  (BCE(sum) + KL, Adam 1e-3), tightened: the data is one preloaded float
  tensor and each batch is a shuffled slice of it (no DataLoader, no
  per-batch `.item()`). The fastest honest PyTorch loop we know."""
  torch.manual_seed(0)
  model = VAE()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  data = torch.from_numpy(images_u8.reshape(-1, 784)).float() / 255.0
  t0 = time.perf_counter()
  perm = torch.randperm(data.shape[0])
  for i in range(0, data.shape[0], batch):
    _vae_step(model, opt, data[perm[i : i + batch]])
  return time.perf_counter() - t0


def vae_epoch_seconds_seed_loop(images_u8, batch: int = 128) -> float:
  """Seed 000's training loop as the notebook writes it, for one epoch:
  `DataLoader(dataset, batch_size=128, shuffle=True)` over a dataset whose
  items go through ToTensor (uint8 [28, 28] -> float [1, 28, 28] / 255),
  `train_loss += loss.item()` every batch and the progress line every 100
  batches (printed to a buffer, not the terminal). torchvision is not
  needed: the dataset does ToTensor's arithmetic itself and skips its PIL
  round trip, so this is a little faster than the notebook."""
  import io

  from torch.utils.data import DataLoader, Dataset

  class Digits(Dataset):
    def __init__(self, images):
      self.images = images.reshape(-1, 28, 28)

    def __len__(self):
      return len(self.images)

    def __getitem__(self, i):
      return torch.from_numpy(self.images[i]).float().div(255).unsqueeze(0), 0

  torch.manual_seed(0)
  model = VAE()
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  loader = DataLoader(Digits(images_u8), batch_size=batch, shuffle=True)
  log = io.StringIO()
  t0 = time.perf_counter()
  train_loss = 0.0
  for batch_idx, (data, _) in enumerate(loader):
    loss = _vae_step(model, opt, data)
    train_loss += loss.item()
    if batch_idx % 100 == 0:
      print(
        f"[{batch_idx * len(data)}/{len(loader.dataset)}]\tLoss: {loss.item() / len(data):.6f}",
        file=log,
      )
  print(f"Average loss: {train_loss / len(loader.dataset):.4f}", file=log)
  return time.perf_counter() - t0


def main(argv=None) -> None:
  p = argparse.ArgumentParser(
    prog=benchmarks.prog(__spec__),
    description="The seeds' PyTorch train step, forward and VAE epoch, alone.",
  )
  p.add_argument("--rounds", type=int, default=4, help="rounds per figure (>= 1)")
  a = p.parse_args(argv)
  if a.rounds < 1:
    p.error(f"--rounds must be >= 1, got {a.rounds}")
  if torch is None:
    raise SystemExit("error: torch is not installed (pip install torch)")
  import numpy as np

  images = np.random.default_rng(0).integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
  train, fwd = make_train_round(128), make_forward_round(64)
  names = ("train step, batch 128 (img/s)", "forward, 64 images (img/s)", "VAE epoch (s)")
  rows = {n: [] for n in names}
  for _ in range(a.rounds):
    train(1)  # one untimed call per round, as benchmarks.run does
    rows[names[0]].append(train(3))
    fwd(1)
    rows[names[1]].append(fwd(9))
    rows[names[2]].append(vae_epoch_seconds(images))
  env = os.environ.get("GLIBC_TUNABLES", "unset")
  preload = os.environ.get("LD_PRELOAD", "unset")
  print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
    f"GLIBC_TUNABLES={env}, LD_PRELOAD={preload}"
  )
  for name, v in rows.items():
    print(f"  {name:32s} median {statistics.median(v):8.2f}  (min {min(v):.2f}, max {max(v):.2f})")


if __name__ == "__main__":
  main()
