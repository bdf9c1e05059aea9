"""Multi-process runs as on a TPU VM pod, with CPU processes on localhost.

Two processes x two CPU devices must train exactly what one process x four
devices trains; a SIGTERM to one process stops both at the same step; a
SIGKILL of one ends the other within the peer timeout and keeps the last
checkpoint. Each test starts several Python processes, so they are few.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpoints, distributed, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset", "smoke", "--steps", "8", "--checkpoint_every_steps", "4"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  env.pop("XLA_FLAGS", None)
  return env


def _start(module: str, args: list, n: int = 2, port=None) -> list:
  """Starts `n` processes of `python -m module args` (two CPU devices each)."""
  port = port or _free_port()
  procs = []
  for i in reversed(range(n)):
    dist = ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(n)]
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", module, *args, *dist, "--process_id", str(i)],
        cwd=ROOT,
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  return procs[::-1]  # index = process id


def _start_code(code: str, *args: str, n: int = 2) -> list:
  """Starts `n` processes of `python -c code 127.0.0.1:PORT process_id *args`."""
  port = _free_port()
  return [
    subprocess.Popen(
      [sys.executable, "-c", code, f"127.0.0.1:{port}", str(i), *args],
      cwd=ROOT,
      env=_env(2),
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(n)
  ]


def _finish(procs: list, timeout: float = 400) -> list:
  out = []
  for p in procs:
    _, err = p.communicate(timeout=timeout)
    out.append((p.returncode, err))
  return out


def _tails(results: list) -> str:
  """Every process's exit code and the end of its stderr: when one fails, the
  other's log often says why (a peer that died first)."""
  return "\n".join(
    f"--- process {i}, exit {rc}:\n{err[-2500:]}" for i, (rc, err) in enumerate(results)
  )


def _single(module: str, args: list, devices: int = 4) -> str:
  r = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stderr


def _metrics(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _state(workdir, step: int) -> dict:
  folder = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.StandardCheckpointer().restore(folder)


def _assert_states_close(a, b) -> None:
  """Every array of two train states agrees to 1e-5 of its own scale. Sums in
  another order differ in the last bits, and Adam divides each gradient by its
  own magnitude, so a few steps turn 1e-7 into 1e-6. Attention key biases are
  skipped: their gradient is zero in exact arithmetic (softmax ignores a
  shift shared by all keys), so Adam makes a random walk of rounding noise."""
  import jax

  flat = dict((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(b)[0])
  checked = 0
  for path, x in jax.tree_util.tree_flatten_with_path(a)[0]:
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      continue
    x, y = np.asarray(x, np.float64), np.asarray(flat[name], np.float64)
    assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y)) + 1e-30, name
    checked += 1
  assert checked > 500


def test_flags_are_checked():
  import argparse

  bad = [
    dict(distributed="auto", coordinator_address="h:1", num_processes=None, process_id=None),
    dict(distributed="off", coordinator_address="h:1", num_processes=2, process_id=None),
    dict(distributed="off", coordinator_address="h:1", num_processes=2, process_id=2),
    dict(distributed="off", coordinator_address="nohost", num_processes=2, process_id=0),
    dict(
      distributed="off", coordinator_address="h:1", num_processes=2, process_id=0, peer_timeout=1
    ),
  ]
  for kwargs in bad:
    with pytest.raises(distributed.UsageError):
      distributed.initialize(argparse.Namespace(**kwargs))
  from experiments import cli

  with pytest.raises(cli.UsageError, match="only local paths, gs:// and s3://"):
    cli.check_path("ftp://bucket/run", "--workdir")
  cli.check_path("/mnt/shared/run", "--workdir")


def test_two_processes_train_what_one_process_trains_and_resume(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  args = ["--workdir", str(multi), *SMOKE, "--data_pipeline", "host"]
  # Two processes reading their rows on the host, stopped after 4 steps and
  # resumed: as one process with four devices and the data on them.
  results = _finish(_start("experiments.mnist_ddpm", args + ["--stop_after_steps", "4"]))
  for rc, err in results:
    assert rc == 0 and "stopped at step 4 of 8" in err, _tails(results)
  results = _finish(_start("experiments.mnist_ddpm", args))
  for rc, err in results:
    assert rc == 0 and "resumed from checkpoint at step 4" in err, _tails(results)
  _single("experiments.mnist_ddpm", ["--workdir", str(single), *SMOKE])

  m, s = _metrics(multi), _metrics(single)
  assert [r["step"] for r in m] == [r["step"] for r in s] == [2, 4, 6, 8]  # one writer, no repeats
  np.testing.assert_allclose([r["loss"] for r in m], [r["loss"] for r in s], rtol=1e-6)
  _assert_states_close(_state(multi, 8), _state(single, 8))
  assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
  assert checkpoints.verify_manifest(str(multi / "checkpoints" / "8")) is None

  # Evaluation on two processes gives the single-process numbers.
  ev = ["--workdir", str(multi), "--sampler", "ddim", "--steps", "3", "--num_samples", "20"]
  results = _finish(_start("experiments.evaluate", ev))
  assert [rc for rc, _ in results] == [0, 0], _tails(results)
  two = json.loads((multi / "eval" / "ddim_3steps_n20.json").read_text())
  _single("experiments.evaluate", ev)
  one = json.loads((multi / "eval" / "ddim_3steps_n20.json").read_text())
  key = next(k for k in one["results"] if k.startswith("DDPM"))
  for metric in ("fd", "kid", "precision", "recall", "readable"):
    assert two["results"][key][metric] == pytest.approx(one["results"][key][metric], rel=1e-5)


def _wait_for_checkpoint(workdir, step: int, procs: list, limit: float = 300) -> None:
  t0 = time.time()
  while not os.path.exists(os.path.join(workdir, "checkpoints", str(step), "sha256.json")):
    assert all(p.poll() is None for p in procs), "a process ended early"
    assert time.time() - t0 < limit, "no checkpoint in time"
    time.sleep(0.5)


def _long_run_with_a_checkpoint(workdir) -> tuple:
  """(args, processes) of a two-process smoke run of 4000 steps, once its step 10 is saved."""
  args = ["--workdir", str(workdir), "--preset", "smoke", "--steps", "4000"]
  args += ["--checkpoint_every_steps", "10", "--log_every_steps", "10"]
  procs = _start("experiments.mnist_ddpm", args)
  _wait_for_checkpoint(workdir, 10, procs)
  return args, procs


def test_sigterm_then_sigkill_of_one_process(tmp_path):
  """SIGTERM to one process: both stop at the same step with a checkpoint and
  exit 143. The rerun resumes there; then SIGKILL of one: the other ends with
  one line and exit 5 within the peer timeout, and the last checkpoint is intact."""
  workdir = tmp_path / "w"
  args, procs = _long_run_with_a_checkpoint(workdir)
  procs[1].send_signal(signal.SIGTERM)
  results = _finish(procs)
  steps = set()
  for rc, err in results:
    assert rc == 143 and "Traceback" not in err, _tails(results)
    line = [x for x in err.splitlines() if x.startswith("SIGTERM at step")][-1]
    steps.add(int(line.split()[3].rstrip(":")))
  (step,) = steps  # the same step on both
  assert checkpoints.verify_manifest(str(workdir / "checkpoints" / str(step))) is None

  procs = _start("experiments.mnist_ddpm", args + ["--peer_timeout", "8"])
  _wait_for_checkpoint(workdir, (step // 10 + 1) * 10, procs)
  procs[1].kill()
  t0 = time.time()
  rc, err = _finish(procs[:1], timeout=180)[0]
  procs[1].wait()
  assert f"resumed from checkpoint at step {step}" in err, err[-3000:]
  assert rc == errors.EXIT_PEER_LOST and time.time() - t0 < 60, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: process 1 of 2 sent no beat for"), err[-3000:]
  assert "stack trace" not in err, err[-3000:]
  latest = max(int(x) for x in os.listdir(workdir / "checkpoints") if x.isdigit())
  assert checkpoints.verify_manifest(str(workdir / "checkpoints" / str(latest))) is None
  results = _finish(_start("experiments.mnist_ddpm", args + ["--stop_after_steps", "2"]))
  for rc, err in results:
    assert rc == 0 and f"resumed from checkpoint at step {latest}" in err, _tails(results)


class _FakeClient:
  """The coordination client's key-value calls; `frozen` peers stop beating."""

  def __init__(self, frozen=(), fail_after=None):
    self.kv, self.frozen, self.calls, self.fail_after = {}, set(frozen), 0, fail_after

  def key_value_set(self, key, value, allow_overwrite=False):
    self.calls += 1
    if self.fail_after is not None and self.calls > self.fail_after:
      raise RuntimeError("UNAVAILABLE: Socket closed")
    self.kv[key] = value
    for p in (1, 2):  # the peers beat along with this process unless frozen
      if p not in self.frozen:
        self.kv[f"ddpm_jax/beat/{p}"] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


@pytest.mark.parametrize(
  "client,expected",
  [
    (_FakeClient(frozen={2}), "process 2 of 3 sent no beat"),
    (_FakeClient(fail_after=3), "the coordinator stopped answering (RuntimeError"),
  ],
)
def test_watchdog_names_the_dead_peer_or_the_lost_coordinator(client, expected):
  lost = []
  thread = distributed.start_watchdog(0.2, 0.01, lost.append, client=client, me=0, n=3)
  thread.join(timeout=10)
  assert not thread.is_alive() and len(lost) == 1 and lost[0].startswith(expected), lost


def test_watchdog_keeps_quiet_while_every_peer_beats():
  lost = []
  distributed.start_watchdog(0.2, 0.01, lost.append, client=_FakeClient(), me=0, n=3)
  time.sleep(0.6)
  assert lost == []


def test_watchdog_stops_watching_a_peer_that_left_in_order():
  lost, client = [], _FakeClient(frozen={2})
  client.kv["ddpm_jax/beat/2"] = "left"  # process 2's farewell: it waits at JAX's shutdown
  distributed.start_watchdog(0.2, 0.01, lost.append, client=client, me=0, n=3)
  time.sleep(0.6)
  distributed.stop_watchdogs()
  assert lost == []


def test_announce_exit_stops_the_beats_and_leaves_a_farewell():
  client = _FakeClient()
  thread = distributed.start_watchdog(0.2, 0.01, lambda m: None, client=client, me=0, n=3)
  distributed.announce_exit()
  assert not thread.is_alive() and client.kv["ddpm_jax/beat/0"] == "left"
  time.sleep(0.05)
  assert client.kv["ddpm_jax/beat/0"] == "left"  # no beat after it


def test_watchdog_stopped_on_exit_gives_no_verdict_when_the_coordinator_goes():
  lost, client = [], _FakeClient()
  thread = distributed.start_watchdog(0.2, 0.01, lost.append, client=client, me=0, n=3)
  time.sleep(0.05)
  distributed.stop_watchdogs()
  client.fail_after = 0  # the coordinator shuts down with the exiting process 0
  time.sleep(0.1)
  assert not thread.is_alive() and lost == []


_LINGER = """
import atexit, sys, time
atexit.register(time.sleep, 5)  # after JAX's shutdown: lingers without a coordinator
import argparse
from experiments import distributed
a = argparse.Namespace(distributed="off", coordinator_address=sys.argv[1], num_processes=2,
                       process_id=int(sys.argv[2]), peer_timeout=30.0)
distributed.initialize(a)
distributed.barrier("done")
"""


def test_processes_that_end_together_exit_zero_though_the_coordinator_goes_first():
  # At exit JAX shuts the runtime down (process 0 takes the coordinator with
  # it) while the other process may still live for a while: no lost peer.
  procs = _start_code(_LINGER)
  results = _finish(procs, timeout=120)
  assert [rc for rc, _ in results] == [0, 0], _tails(results)


# A job through the jobs' own exit path (`cli.exit_main`), two processes, a 4 s
# peer timeout; `{body}` runs after both have passed a first barrier.
_JOB = """
import argparse, sys, time
from experiments import cli, distributed
def main(argv):
  a = argparse.Namespace(distributed="off", coordinator_address=argv[0], num_processes=2,
                         process_id=int(argv[1]), peer_timeout=4.0)
  distributed.initialize(a)
  distributed.barrier("one")
{body}
cli.exit_main(main)
"""
_ENDS_APART = _JOB.format(
  body="""  if a.process_id == 1:
    time.sleep(10)  # its own last part, past the peer timeout, after process 0 has ended"""
)


def test_a_process_that_ends_first_in_order_is_not_taken_for_lost():
  """Process 0 ends (exit 0) and waits at JAX's shutdown barrier, beatless,
  while process 1 finishes for longer than the peer timeout: both exit 0.
  Without the farewell, process 1 declared process 0 lost (exit 5) and JAX
  aborted process 0 at its heartbeat timeout, 90 s later."""
  procs = _start_code(_ENDS_APART)
  t0 = time.time()
  results = _finish(procs, timeout=150)
  assert [rc for rc, _ in results] == [0, 0], _tails(results)
  assert time.time() - t0 < 60, _tails(results)


_FAILS_ALONE = _JOB.format(
  body="""  if a.process_id == int(argv[2]):
    raise OSError(28, "No space left on device")
  distributed.barrier("two")  # the other waits here for the one that failed"""
)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_that_fails_alone_exits_with_its_code_and_the_other_with_5(failing):
  """One process fails (a full disk: exit 4, one line); the other, waiting for
  it in a collective, ends with exit 5 and one line (its watchdog's verdict,
  or on CPU gloo's closed connection, whichever comes first). Before, the failing
  process waited in JAX's shutdown barrier and was aborted (exit 134, a C++
  stack trace; process 0 only after JAX's 90 s heartbeat timeout)."""
  procs = _start_code(_FAILS_ALONE, str(failing))
  t0 = time.time()
  results = _finish(procs, timeout=150)
  codes = [rc for rc, _ in results]
  assert codes[failing] == errors.EXIT_IO and codes[1 - failing] == errors.EXIT_PEER_LOST, _tails(
    results
  )
  assert time.time() - t0 < 60, _tails(results)
  assert not any("stack trace" in err for _, err in results), _tails(results)
  assert "No space left on device" in results[failing][1].strip().splitlines()[-1], _tails(results)
  other = results[1 - failing][1].strip().splitlines()[-1]
  assert other.startswith("error: ") and "rerun every process" in other, _tails(results)


def test_vae_on_two_processes_gives_the_numbers_of_one(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  args = ["--preset", "smoke", "--epochs", "2"]
  results = _finish(_start("experiments.mnist_vae", ["--workdir", str(multi), *args]))
  assert [rc for rc, _ in results] == [0, 0], _tails(results)
  _single("experiments.mnist_vae", ["--workdir", str(single), *args], devices=2)
  two = json.loads((multi / "final_eval.json").read_text())
  one = json.loads((single / "final_eval.json").read_text())
  for k in ("test_nll_iwae", "test_neg_elbo", "final_test_loss"):
    assert two[k] == pytest.approx(one[k], rel=1e-6), k
  assert [r["epoch"] for r in _metrics(multi)] == [1, 2]  # one writer


@pytest.mark.parametrize("differ", [False, True])
def test_replicate_checks_the_processes_agree_in_one_all_gather(differ, tmp_path):
  port, script = _free_port(), os.path.join(ROOT, "tests", "scripts", "replicate_check.py")
  procs = [
    subprocess.Popen(
      [sys.executable, script, str(port), str(i), "1" if differ else "0", str(tmp_path / f"{i}")],
      cwd=ROOT,
      env=dict(_env(2), PYTHONPATH=ROOT),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  results = []
  for i, p in enumerate(procs):
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads((tmp_path / f"{i}").read_text()))
  for r in results:
    if differ:  # both processes refuse, naming the one that differs
      assert "processes [1] hold other values than process 0" in r["error"], r
    else:  # 60 leaves, one all-gather (jax.device_put ran one per leaf)
      assert r["ok"] and r["gathers"] == 1, r
