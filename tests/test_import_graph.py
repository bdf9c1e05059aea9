"""The tree's import graph: dependencies point one way (libraries, then job
plumbing, then jobs), with no cycles and no job importing another job."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nnbase", "ddpm_jax", "vae_jax", "sample_quality", "experiments", "benchmarks")
LIBRARIES = ("nnbase", "ddpm_jax", "vae_jax", "sample_quality")


def modules() -> dict:
  """{dotted module name: path} of every project module."""
  out = {}
  for pkg in PACKAGES:
    for d, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
          out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
  return out


def imports(path: str, mods: dict) -> set:
  """Project modules imported anywhere in the file (functions included)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      while name and name not in mods:
        name = name.rpartition(".")[0]
      if name:
        found.add(name)
  return found


def graph() -> dict:
  mods = modules()
  g = {m: imports(p, mods) - {m} for m, p in mods.items()}
  # A package's __init__ re-exports its modules; a module reaching its own
  # package's __init__ is not a dependency on its siblings.
  for m in g:
    g[m] = {d for d in g[m] if not (d in PACKAGES and m.startswith(d + "."))}
  return g


def _is_entry_point(path: str) -> bool:
  """Whether the module has a top-level `if __name__ == "__main__":`."""
  for node in ast.parse(open(path, encoding="utf-8").read()).body:
    if isinstance(node, ast.If):
      names = [n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)]
      consts = [n.value for n in ast.walk(node.test) if isinstance(n, ast.Constant)]
      if "__name__" in names and "__main__" in consts:
        return True
  return False


def jobs() -> set:
  return {m for m, p in modules().items() if m.startswith("experiments.") and _is_entry_point(p)}


def find_cycle(g: dict):
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(g.get(m, ())):
      if state.get(d) == 1:
        return stack[stack.index(d) :] + [d]
      if d not in state:
        cycle = visit(d)
        if cycle:
          return cycle
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(g):
    if m not in state:
      cycle = visit(m)
      if cycle:
        return cycle
  return None


def test_no_import_cycles():
  assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_job_imports_another_job():
  g, js = graph(), jobs()
  assert {"experiments.mnist_ddpm", "experiments.evaluate", "experiments.sample"} <= js
  bad = sorted((j, d) for j in js for d in g[j] if d in js)
  assert not bad, bad


def test_libraries_do_not_import_jobs_or_benchmarks():
  g = graph()
  bad = sorted(
    (m, d)
    for m in g
    if m.split(".")[0] in LIBRARIES
    for d in g[m]
    if d.split(".")[0] in ("experiments", "benchmarks")
  )
  assert not bad, bad


def test_the_base_imports_no_other_package_and_libraries_stay_apart():
  """nnbase is the bottom layer; vae_jax and sample_quality do not reach into ddpm_jax."""
  g = graph()
  allowed = {
    "nnbase": {"nnbase"},
    "ddpm_jax": {"nnbase", "ddpm_jax"},
    "vae_jax": {"nnbase", "vae_jax"},
    "sample_quality": {"nnbase", "sample_quality"},
  }
  bad = sorted(
    (m, d)
    for m in g
    if m.split(".")[0] in allowed
    for d in g[m]
    if d.split(".")[0] not in allowed[m.split(".")[0]]
  )
  assert not bad, bad


def test_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
