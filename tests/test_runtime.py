"""The jobs' process set-up: huge pages for malloc, one JAX device per CPU core
(experiments/runtime.py)."""

import os
import subprocess
import sys

import pytest

from experiments import runtime


def test_hugepages_env_adds_the_tunable_and_keeps_others():
  env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.check=0"}
  out = runtime.hugepages_env(env, (2, 36), "madvise")
  assert out["GLIBC_TUNABLES"] == "glibc.malloc.check=0:" + runtime.TUNABLE
  assert out["PATH"] == "/bin" and env["GLIBC_TUNABLES"] == "glibc.malloc.check=0"
  assert runtime.hugepages_active(out) and not runtime.hugepages_active(env)
  assert runtime.hugepages_env({}, (2, 35), "always") == {"GLIBC_TUNABLES": runtime.TUNABLE}


@pytest.mark.parametrize(
  "env, glibc, thp",
  [
    ({"GLIBC_TUNABLES": runtime.TUNABLE}, (2, 36), "madvise"),  # already set: no restart loop
    ({runtime.OPT_OUT: "0"}, (2, 36), "madvise"),  # opted out
    ({}, (2, 34), "madvise"),  # glibc without the tunable
    ({}, None, "madvise"),  # not glibc (musl, macOS)
    ({}, (2, 36), "never"),  # transparent huge pages off
    ({}, (2, 36), None),  # no THP in this kernel
  ],
)
def test_hugepages_env_leaves_the_process_alone(env, glibc, thp):
  assert runtime.hugepages_env(env, glibc, thp) is None


def test_thp_mode_reads_the_selected_mode(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert runtime.thp_mode(str(f)) == "madvise"
  f.write_text("[never]\n")
  assert runtime.thp_mode(str(f)) == "never"
  assert runtime.thp_mode(str(tmp_path / "missing")) is None


def test_python_m_restarts_with_the_tunable(tmp_path):
  """`python -m experiments.X` restarts once with the tunable, same arguments."""
  root = tmp_path / "pkgroot"
  root.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
  expect = runtime.hugepages_env(env, runtime.glibc_version(), runtime.thp_mode()) is not None
  code = (
    "import sys, os; import experiments; print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])"
  )
  (root / "probe_main.py").write_text(code)
  env["PYTHONPATH"] = os.pathsep.join([str(root), os.getcwd()])
  out = subprocess.run(
    [sys.executable, "-m", "probe_main", "a", "--b=1"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # A module that is not `experiments.X` is not restarted by importing experiments.
  assert out == "['a', '--b=1']"
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys, experiments, os; print(os.environ.get('GLIBC_TUNABLES', ''))",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  assert out == ""
  (root / "experiments_probe").mkdir()
  (root / "experiments_probe" / "__init__.py").write_text(
    "from experiments.runtime import reexec_with_hugepages\nreexec_with_hugepages()\n"
  )
  (root / "experiments_probe" / "show.py").write_text(
    "import os, sys\nprint(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
  )
  out = subprocess.run(
    [sys.executable, "-m", "experiments_probe.show", "a", "--b=1"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  assert out == (f"{runtime.TUNABLE} ['a', '--b=1']" if expect else "['a', '--b=1']")
  env[runtime.OPT_OUT] = "0"
  out = subprocess.run(
    [sys.executable, "-m", "experiments_probe.show", "x"],
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  assert out == "['x']"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry_points() -> list:
  """Modules of experiments/ and benchmarks/ whose `__main__` sets up the process."""
  out = []
  for package in ("experiments", "benchmarks"):
    for name in sorted(os.listdir(os.path.join(ROOT, package))):
      path = os.path.join(ROOT, package, name)
      if name.endswith(".py") and name != "runtime.py":
        parts = open(path, encoding="utf-8").read().split('if __name__ == "__main__":')
        if len(parts) > 1 and ("exit_main(" in parts[-1] or "split_cpu_devices()" in parts[-1]):
          out.append(path)
  return out


def test_entry_points_restart_before_their_imports():
  """Each entry point's first statement after `from experiments import runtime`
  is `runtime.restart_main(__name__)`: a restart after the module's imports
  loads JAX and the libraries twice (2.5-3 s per launch)."""
  import ast

  paths = _entry_points()
  assert len(paths) >= 11, paths
  for path in paths:
    body = ast.parse(open(path, encoding="utf-8").read()).body
    first = None
    for node in body:
      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        continue  # the docstring
      if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        continue
      if isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["runtime"]:
        continue
      first = ast.unparse(node)
      break
    assert first == "runtime.restart_main(__name__)", (path, first)


def test_restarted_launch_imports_jax_once():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
  if runtime.hugepages_env(env, runtime.glibc_version(), runtime.thp_mode()) is None:
    pytest.skip("no huge-pages restart on this machine")
  p = subprocess.run(
    [sys.executable, "-X", "importtime", "-m", "experiments.sample", "--help"],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  names = [line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line]
  imported = names.count
  # runtime.py loads in both processes (it restarts the first), JAX only in the second.
  assert (imported("experiments.runtime"), imported("jax")) == (2, 1), p.stderr[-3000:]


def test_cpu_device_count_is_a_power_of_two_up_to_the_cap():
  counts = [runtime.cpu_device_count(c) for c in (1, 2, 3, 4, 6, 8, 12, 96)]
  assert counts == [1, 2, 2, 4, 4, 8, 8, runtime.MAX_CPU_DEVICES]


@pytest.mark.parametrize(
  "env", [{"JAX_NUM_CPU_DEVICES": "1"}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}]
)
def test_split_cpu_devices_leaves_a_users_choice_alone(env):
  assert runtime.split_cpu_devices(env) is None


def test_split_cpu_devices_gives_a_device_per_core(tmp_path):
  """A job's set-up makes the CPU one JAX device per core (up to a power of
  two), and a batch they do not divide runs on fewer; JAX_NUM_CPU_DEVICES=1
  keeps one."""
  code = (
    "from experiments import runtime\nruntime.split_cpu_devices()\n"
    "import jax\nprint(jax.local_device_count(), len(runtime.batch_devices(64)),"
    " len(runtime.batch_devices(75)))\n"
  )
  (tmp_path / "probe_devices.py").write_text(code)
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]), JAX_PLATFORMS="cpu")
  run = lambda e: subprocess.run(
    [sys.executable, "-m", "probe_devices"], env=e, capture_output=True, text=True, check=True
  ).stdout.strip()
  n = runtime.cpu_device_count(len(os.sched_getaffinity(0)))
  odd = max(k for k in range(1, n + 1) if 75 % k == 0)  # an odd batch runs on fewer
  assert run(env) == f"{n} {n} {odd}"
  assert run(dict(env, JAX_NUM_CPU_DEVICES="1")) == "1 1 1"


# The allocation cache (experiments/alloc_cache.c), preloaded by the restart.
needs_cache = pytest.mark.skipif(
  runtime.alloc_cache_library() is None, reason="no glibc or no C compiler"
)


def test_alloc_cache_env_adds_the_preload_once_and_keeps_others():
  lib = "/c/alloc_cache_0123.so"
  out = runtime.alloc_cache_env({"LD_PRELOAD": "/x/libfoo.so", "PATH": "/bin"}, lib)
  assert out == {"LD_PRELOAD": "/x/libfoo.so:" + lib, "PATH": "/bin"}
  assert runtime.alloc_cache_active(out) and not runtime.alloc_cache_active({})
  assert runtime.alloc_cache_env(out, lib) is None  # already preloaded: no restart loop
  assert runtime.alloc_cache_env({runtime.ALLOC_CACHE_OPT_OUT: "0"}, lib) is None
  assert runtime.alloc_cache_env({}, None) is None  # nothing to preload
  env = {runtime.OPT_OUT: "0", runtime.ALLOC_CACHE_OPT_OUT: "0"}
  assert runtime.restart_env(env) is None  # both opted out: no restart


# Run under LD_PRELOAD: reads the library's counters through ctypes.
_CACHE_PROBE = r"""
import ctypes, sys
c = ctypes.CDLL(None)
c.malloc.restype = c.realloc.restype = ctypes.c_void_p
c.malloc.argtypes = [ctypes.c_size_t]
c.free.argtypes = [ctypes.c_void_p]
c.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
c.malloc_usable_size.argtypes = [ctypes.c_void_p]
c.malloc_usable_size.restype = ctypes.c_size_t
def stats():
  v = [ctypes.c_ulong(), ctypes.c_ulong(), ctypes.c_ulong(), ctypes.c_size_t()]
  c.ddpm_alloc_cache_stats(*[ctypes.byref(x) for x in v])
  return tuple(x.value for x in v)
MB = 1 << 20
s0 = stats()
a = c.malloc(100 * MB)
ctypes.memset(a, 7, 100 * MB)
c.free(a)
b = c.malloc(90 * MB)  # same size class: the same block, still mapped
out = {"reused": a == b, "aligned": a % (2 * MB) == 0, "usable": c.malloc_usable_size(b) >= 90 * MB}
ctypes.memset(b, 1, 10)
r = c.realloc(b, 300 * MB)  # grows: a new block, the contents copied
out["realloc_kept"] = ctypes.string_at(r, 12) == b"\x01" * 10 + b"\x07" * 2
p = ctypes.c_void_p()
out["memalign"] = c.posix_memalign(ctypes.byref(p), 4096, 64 * MB) == 0 and p.value % 4096 == 0
c.free(p); c.free(r)
small = c.malloc(1000)
out["small_from_glibc"] = small % (2 * MB) != 0 and c.malloc_usable_size(small) >= 1000
c.free(small)
c.ddpm_alloc_cache_enable(0)
d = c.malloc(100 * MB)
out["off_goes_to_glibc"] = d % (2 * MB) != 0
c.free(d)
s1 = stats()
out["maps_hits"] = (s1[0] - s0[0], s1[1] - s0[1])
out["kept_mb"] = s1[3] // MB
print(repr(out))
"""


def _probe(env_extra):
  lib = runtime.alloc_cache_library()
  env = {**os.environ, "LD_PRELOAD": lib, **env_extra}
  p = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr[-2000:]
  import ast

  return ast.literal_eval(p.stdout.strip())


@needs_cache
def test_alloc_cache_reuses_large_blocks_and_leaves_small_ones_to_glibc():
  out = _probe({})
  # Mapped: 100 MB and the realloc's 300 MB. Hits: the 90 MB and the 64 MB
  # request (a freed 100 MB block serves 50-100 MB).
  assert out.pop("maps_hits") == (2, 2)
  assert out.pop("kept_mb") == 400  # freed blocks stay mapped, under the cap
  assert all(out.values()), out


@needs_cache
def test_alloc_cache_unmaps_what_its_cap_does_not_hold():
  out = _probe({"DDPM_JAX_ALLOC_CACHE_MB": "150"})
  assert out["reused"] and out["realloc_kept"], out
  assert out["kept_mb"] <= 150, out


@needs_cache
def test_jax_under_the_alloc_cache_computes_the_same_and_stops_faulting(tmp_path):
  """A jitted program with a ~100 MB temporary buffer: the same numbers with
  and without the cache, and that block no longer faulted in on every call."""
  code = r"""
import resource, sys, numpy as np, jax, jax.numpy as jnp
f = jax.jit(lambda x: (lambda m: m @ x + m.sum(0))(jnp.tanh(jnp.outer(x, x))))  # m: 100 MB
x = jnp.linspace(-1.0, 1.0, 5000, dtype=jnp.float32)
f(x).block_until_ready()
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  y = f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 5)
np.save(sys.argv[1], np.asarray(y))
"""
  lib = runtime.alloc_cache_library()
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
  faults = {}
  for name, env in (("off", base), ("on", {**base, "LD_PRELOAD": lib})):
    p = subprocess.run(
      [sys.executable, "-c", code, str(tmp_path / f"{name}.npy")],
      env={**env, "JAX_NUM_CPU_DEVICES": "1"},
      capture_output=True,
      text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    faults[name] = int(p.stdout.split()[-1])
  import numpy as np

  np.testing.assert_array_equal(np.load(tmp_path / "on.npy"), np.load(tmp_path / "off.npy"))
  # Off: the 100 MB faulted in every call (~25k pages); on: the program's
  # smaller allocations only (~1.6k).
  assert faults["on"] * 5 < faults["off"], faults


@needs_cache
def test_python_m_restarts_with_the_alloc_cache(tmp_path):
  root = tmp_path / "pkgroot"
  (root / "experiments_probe2").mkdir(parents=True)
  (root / "experiments_probe2" / "__init__.py").write_text(
    "from experiments.runtime import reexec_with_hugepages\nreexec_with_hugepages()\n"
  )
  (root / "experiments_probe2" / "show.py").write_text(
    "import os\nprint(os.environ.get('LD_PRELOAD', ''))\n"
  )
  drop = ("LD_PRELOAD", runtime.ALLOC_CACHE_OPT_OUT)
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env["PYTHONPATH"] = os.pathsep.join([str(root), ROOT])
  cmd = [sys.executable, "-m", "experiments_probe2.show"]
  run = lambda e: subprocess.run(
    cmd, env=e, capture_output=True, text=True, check=True
  ).stdout.strip()
  assert run(env) == runtime.alloc_cache_library()
  assert run({**env, runtime.ALLOC_CACHE_OPT_OUT: "0"}) == ""
