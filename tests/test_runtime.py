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
