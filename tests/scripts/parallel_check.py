"""Run with JAX_NUM_CPU_DEVICES=4: compares 1-device and 4-device results.

Prints one JSON line; tests/test_parallel.py asserts on it.
"""

import json

import jax
import numpy as np
import optax

import ddpm_jax as dj
from ddpm_jax import parallel
from nnbase import conv


def main():
  devices = jax.devices()
  assert len(devices) == 4, devices
  model = dj.make_model("test")
  schedule = dj.make_schedule("linear", 50)
  # Plain SGD: Adam divides by sqrt(v) and so magnifies float rounding in
  # near-zero gradients; SGD keeps the comparison about the gradients.
  tx = optax.sgd(0.05)
  init = lambda: dj.create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
  batch = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1)) * 2 - 1
  step = dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(2))
  out = {}
  results = {}
  for n in (1, 4):
    mesh = parallel.make_mesh(devices[:n])
    f = parallel.parallel_train_step(step, mesh)
    state = parallel.replicate(init(), mesh)
    x = parallel.shard_batch(batch, mesh)
    for _ in range(2):
      state, m = f(state, x)
    results[n] = (jax.device_get(state), float(m["loss"]), x.sharding.num_devices)
    out[f"grad_norm_{n}"] = float(m["grad_norm"])

    def sample(params, rng, mesh=mesh):
      eps_fn = parallel.sharded_eps_fn(dj.model_eps_fn(model, params), mesh)
      return dj.ddim_sample(eps_fn, schedule, rng, (8, 28, 28, 1), 5)

    s = parallel.parallel_sampler(sample, mesh)(state.ema_params, jax.random.key(3))
    results[n] += (np.asarray(s), len(s.sharding.device_set))
  (s1, l1, _, x1, _), (s4, l4, nd, x4, sd) = results[1], results[4]
  diffs = jax.tree.leaves(
    jax.tree.map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), s1.params, s4.params
    )
  )
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(s1.params))
  out.update(
    loss_1=l1,
    loss_4=l4,
    param_max_diff=max(diffs),
    param_scale=scale,
    batch_devices=nd,
    sample_devices=sd,
    sample_max_diff=float(np.max(np.abs(x1 - x4))),
    step_4=int(s4.step),
  )
  # Reference: the plain single-device jit of the same step.
  ref_state = init()
  plain = jax.jit(step)
  for _ in range(2):
    ref_state, m = plain(ref_state, batch)
  out["plain_vs_4_max_diff"] = max(
    jax.tree.leaves(
      jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        ref_state.params,
        s4.params,
      )
    )
  )
  out.update(gemm_conv_check(batch, schedule, tx, devices))
  try:
    parallel.shard_batch(batch[:6], parallel.make_mesh(devices))
    out["indivisible_error"] = None
  except ValueError as e:
    out["indivisible_error"] = str(e)
  mesh4 = parallel.make_mesh(devices)
  eps_fn = parallel.sharded_eps_fn(lambda x, t: x, mesh4)
  try:  # 6 images on 4 devices: named while tracing
    jax.jit(lambda r: dj.ddim_sample(eps_fn, schedule, r, (6, 4, 4, 1), 2)).trace(jax.random.key(0))
    out["indivisible_sampler_error"] = None
  except ValueError as e:
    out["indivisible_sampler_error"] = str(e)
  print(json.dumps(out))


def gemm_conv_check(batch, schedule, tx, devices):
  """The seed net's layers on the fast CPU convolutions (`nnbase.conv`), one
  device against four: each device must scan its own rows (no all-gather of
  the batch) and give the same step and samples. Chunks of one image, so
  every convolution is a scan over chunks as at full size."""
  conv.CHUNK_BYTES = 1
  model = dj.make_model("simple", channels=(8, 16, 32), time_dim=16, gemm_conv=True)
  step = dj.make_train_step(model, schedule, tx, base_rng=jax.random.key(2))
  init = lambda: dj.create_train_state(jax.random.key(0), model, tx, (28, 28, 1))
  res = {}
  for n in (1, 4):
    mesh = parallel.make_mesh(devices[:n])
    f = parallel.parallel_train_step(step, mesh)
    state, x = parallel.replicate(init(), mesh), parallel.shard_batch(batch, mesh)
    # The executables compiled for their HLO also run the step and the
    # sampler (calling `f` would compile each again).
    compiled = f.lower(state, x).compile()
    hlo = compiled.as_text()
    state, m = compiled(state, x)

    def sample(params, rng, mesh=mesh):
      eps_fn = parallel.sharded_eps_fn(dj.model_eps_fn(model, params), mesh)
      return dj.ddim_sample(eps_fn, schedule, rng, (8, 28, 28, 1), 3)

    sampler = parallel.parallel_sampler(sample, mesh)
    s_compiled = sampler.lower(state.params, jax.random.key(3)).compile()
    s_hlo = s_compiled.as_text()
    s = np.asarray(s_compiled(state.params, jax.random.key(3)))
    gathers = hlo.count("all-gather(") + s_hlo.count("all-gather(")
    # Winograd weight gradients in the transformed domain ([k*k, Cout, Cin]).
    k2 = (conv.WINOGRAD_TILE + 2) ** 2
    wino = sum("all-reduce" in line and f"f32[{k2}," in line for line in hlo.splitlines())
    res[n] = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(state.params), s, gathers)
  (l1, g1, p1, s1, _), (l4, g4, p4, s4, a4) = res[1], res[4]
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, p4)
  return {
    "gemm_all_gathers_4": a4,
    "winograd_domain_all_reduces_4": wino,
    "gemm_loss_diff": abs(l1 - l4),
    "gemm_grad_norm_rel_diff": abs(g1 - g4) / g1,
    "gemm_param_max_diff": max(jax.tree.leaves(diffs)),
    "gemm_sample_max_diff": float(np.max(np.abs(s1 - s4))),
  }


if __name__ == "__main__":
  main()
