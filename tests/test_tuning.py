"""The fast convolutions' machine-dependent constants (nnbase/tuning.py)."""

import json

from nnbase import conv, tuning


def test_rule_follows_the_last_level_cache():
  mib = tuning.MIB
  assert tuning.rule_chunk_bytes({"L1d": 48 * 1024, "L2": mib, "L3": 32 * mib}) == 7 * mib
  assert tuning.rule_chunk_bytes({"L1d": 32 * 1024, "L2": 2 * mib, "L3": 16 * mib}) == 3.5 * mib
  assert tuning.rule_chunk_bytes({"L2": 2 * mib}) == mib  # floor
  assert tuning.rule_chunk_bytes({"L3": 512 * mib}) == 32 * mib  # ceiling
  assert tuning.rule_chunk_bytes({}) == tuning.DEFAULT_CHUNK_BYTES


def test_cached_choice_is_used_only_on_its_machine(tmp_path, monkeypatch):
  path = tmp_path / "conv_tuning.json"
  monkeypatch.setattr(tuning, "CACHE_FILE", str(path))
  assert tuning.cached_choice() is None and tuning.chunk_bytes() == tuning.rule_chunk_bytes()
  assert tuning.strided_forward_xla() is True and tuning.winograd_tile() == 4
  tuning.save_choice(3 * tuning.MIB, False, {"x": 1}, strided_forward_xla=False, winograd_tile=2)
  assert tuning.chunk_bytes() == 3 * tuning.MIB and tuning.gemm_default() is False
  assert tuning.strided_forward_xla() is False and tuning.winograd_tile() == 2
  monkeypatch.setenv("DDPM_JAX_CONV_TUNING", "off")
  assert tuning.cached_choice() is None and tuning.gemm_default() is True
  monkeypatch.delenv("DDPM_JAX_CONV_TUNING")
  record = json.loads(path.read_text())
  # A record from before the strided-forward and Winograd choices keeps their defaults.
  old = {k: v for k, v in record.items() if k not in ("strided_forward_xla", "winograd_tile")}
  path.write_text(json.dumps(old))
  assert tuning.chunk_bytes() == 3 * tuning.MIB and tuning.strided_forward_xla() is True
  assert tuning.winograd_tile() == 4
  path.write_text(json.dumps(dict(record, winograd_tile=3)))  # not a tile we have
  assert tuning.winograd_tile() == 4
  path.write_text(json.dumps(dict(record, machine="another CPU | L3=1")))
  assert tuning.cached_choice() is None
  path.write_text(json.dumps(dict(record, chunk_bytes="big")))
  assert tuning.cached_choice() is None
  path.write_text("{torn")
  assert tuning.cached_choice() is None


def test_gemm_default_off_keeps_xla_convolutions(monkeypatch):
  monkeypatch.setattr(conv, "GEMM_BY_DEFAULT", False)
  assert not conv.use_gemm_conv(None, 64, 64)
  assert conv.use_gemm_conv(True, 64, 64)
  monkeypatch.setattr(conv, "GEMM_BY_DEFAULT", True)
  assert conv.use_gemm_conv(None, 64, 64) == (conv.jax.default_backend() == "cpu")
