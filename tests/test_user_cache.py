"""nnbase.user_cache: the cache folder, and libraries built once per source."""

import os
import subprocess
import sys

import pytest

from nnbase import user_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILERS = (os.environ.get("CC"), "cc", "gcc")
needs_cc = pytest.mark.skipif(user_cache.find_compiler(COMPILERS) is None, reason="no C compiler")


@needs_cc
def test_a_source_builds_once_and_an_edited_one_anew(tmp_path):
  src, out = tmp_path / "f.c", tmp_path / "build"
  src.write_text("int f(void) { return 1; }\n")
  first = user_cache.build_library(str(src), str(out), "f", COMPILERS)
  assert os.path.basename(first).startswith("f_") and os.path.exists(first)
  stamp = os.stat(first).st_mtime_ns
  assert user_cache.build_library(str(src), str(out), "f", COMPILERS) == first
  assert os.stat(first).st_mtime_ns == stamp  # not rebuilt
  # Built already: found without any compiler on PATH.
  assert user_cache.build_library(str(src), str(out), "f", ("no-such-cc",)) == first
  src.write_text("int f(void) { return 2; }\n")
  second = user_cache.build_library(str(src), str(out), "f", COMPILERS)
  assert second != first and sorted(os.listdir(out)) == sorted(
    os.path.basename(p) for p in (first, second)
  )
  salted = user_cache.build_library(str(src), str(out), "f", COMPILERS, salt=b"v2")
  assert salted not in (first, second)


def test_no_compiler_is_one_line(tmp_path):
  src = tmp_path / "f.c"
  src.write_text("int f(void) { return 1; }\n")
  with pytest.raises(
    RuntimeError, match=r"^no compiler on PATH to build f.c \(tried x-cc, y-cc\)$"
  ):
    user_cache.build_library(str(src), str(tmp_path / "b"), "f", (None, "x-cc", "y-cc"))
  assert not (tmp_path / "b").exists()


@needs_cc
def test_a_failed_build_is_one_line_and_leaves_nothing(tmp_path):
  src, out = tmp_path / "bad.c", tmp_path / "build"
  src.write_text("this is not C\n")
  with pytest.raises(RuntimeError, match="failed") as e:
    user_cache.build_library(str(src), str(out), "bad", COMPILERS)
  assert "\n" not in str(e.value)
  assert list(out.iterdir()) == []


def test_the_folder_follows_xdg_and_importing_it_starts_no_jax(tmp_path):
  """The jobs' process set-up imports this module before it restarts, so it
  must not import JAX (nor the rest of nnbase)."""
  code = (
    "import sys; from nnbase import user_cache; "
    "print(user_cache.CACHE_DIR); print('jax' in sys.modules, 'nnbase.conv' in sys.modules)"
  )
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
  p = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  )
  assert p.stdout.split("\n")[:2] == [str(tmp_path / "ddpm_jax"), "False False"], p.stdout


def test_the_package_still_exports_its_names_on_first_use():
  import nnbase
  from nnbase import Conv, WeightsError, conv, param_files

  assert Conv is conv.Conv and WeightsError is param_files.WeightsError
  assert set(nnbase.__all__) <= set(dir(nnbase)) and nnbase.tuning.MIB == 2**20
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    nnbase.nope  # noqa: B018
