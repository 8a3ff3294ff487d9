"""`python -m sdseg_jax.convert`: official checkpoints -> weight artifacts, and its errors."""

import os
import pathlib
import subprocess
import sys

from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

from sdseg_jax.weights import artifacts
from sdseg_jax.weights import convert
from tests import official_models

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = "tests/configs/official_tiny.py"


def run_convert(fixtures, *args):
  env = dict(os.environ, SDSEG_OFFICIAL_FIXTURES=str(fixtures), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "sdseg_jax.convert", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind,ckpt,key", [
    ("autoencoder", "tiny_klf8_autoencoder.ckpt", "vae"),
    ("ldm_unet", "tiny_ldm_unet4ch.ckpt", "unet"),
    ("sdseg", "tiny_sdseg_trained.ckpt", "unet"),
])
def test_convert_writes_artifact_and_summary(official_fixtures, tmp_path, kind, ckpt, key):
  out = tmp_path / f"{kind}.npz"
  proc = run_convert(official_fixtures, f"--config={TINY_CONFIG}", f"--kind={kind}",
                     f"--checkpoint={official_fixtures / ckpt}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "tensors mapped" in proc.stdout and "parameters" in proc.stdout
  tree, meta = artifacts.load(out)
  assert meta["kind"] == kind and key in tree
  if kind == "sdseg":
    # The CLI takes the EMA UNet by default: equal to the in-process EMA conversion.
    _, expected, _ = official_models.load_trained(official_fixtures, use_ema=True)
    np.testing.assert_array_equal(tree["unet"]["out_2"]["kernel"],
                                  expected["unet"]["out_2"]["kernel"])
    assert float(tree["scale_factor"]) == pytest.approx(0.12)
    assert "ignored" in proc.stdout and "online UNet" in proc.stdout


def _expected_leaves(state, prefix, ignored):
  """Official tensors -> {(flax parent path, torch leaf name): array} by layout rules alone.

  Key: dots become path levels, a number joins the name before it ("input_blocks.1.0" ->
  "input_blocks_1_0"); "weight" is a conv/linear kernel, a norm scale or an embedding. Layout:
  conv OIHW -> HWIO, linear (out, in) -> (in, out), the attention's 1-D convs (O, I, 1) ->
  (I, O).
  """
  expected = {}
  for key, value in state.items():
    if not key.startswith(prefix) or key in ignored:
      continue
    tokens = key[len(prefix):].split(".")
    parts = []
    for token in tokens[:-1]:
      if token.isdigit() and parts:
        parts[-1] += "_" + token
      else:
        parts.append(token)
    value = np.asarray(value)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 3:
      value = value[..., 0].T
    elif value.ndim == 2 and tokens[-1] == "weight":
      value = value.T
    expected[("/".join(parts), tokens[-1])] = value
  return expected


@pytest.mark.parametrize("kind,ckpt,key,prefix", [
    ("autoencoder", "tiny_klf8_autoencoder.ckpt", "vae", ""),
    ("ldm_unet", "tiny_ldm_unet4ch.ckpt", "unet", "model.diffusion_model."),
])
def test_converted_values_follow_the_layout_rules(official_fixtures, tmp_path, kind, ckpt,
                                                  key, prefix):
  """Every tensor of the CLI's artifact, checked against the official file by layout rules."""
  out = tmp_path / f"{kind}.npz"
  proc = run_convert(official_fixtures, f"--config={TINY_CONFIG}", f"--kind={kind}",
                     f"--checkpoint={official_fixtures / ckpt}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  tree, _ = artifacts.load(out)
  got = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree[key]).items()}
  state = official_models.state_dict(official_fixtures / ckpt)
  ignored = {k for k in state if k.startswith(("loss.", "first_stage_model."))}
  expected = _expected_leaves(state, prefix, ignored)
  by_parent = {}
  for path in got:
    parent, leaf = path.rsplit("/", 1)
    by_parent.setdefault(parent, {})[leaf] = path
  matched = set()
  widened = "input_blocks_0_0"
  for (parent, name), value in expected.items():
    leaves = by_parent.get(parent, {})
    candidates = [leaves[n] for n in (("kernel", "scale", "embedding") if name == "weight"
                                      else (name,)) if n in leaves]
    assert len(candidates) == 1, (parent, name, sorted(leaves))
    path = candidates[0]
    matched.add(path)
    if kind == "ldm_unet" and path == f"{widened}/kernel":
      # 4 latent input channels from the file, the 4 condition channels zero-filled.
      np.testing.assert_array_equal(got[path][:, :, :value.shape[2]], value)
      assert got[path].shape[2] == 2 * value.shape[2] and not got[path][:, :, value.shape[2]:].any()
      continue
    np.testing.assert_array_equal(got[path], value, err_msg=path)
  assert matched == set(got), sorted(set(got) - matched)[:5]


def test_converted_autoencoder_reproduces_the_official_outputs(official_fixtures, tmp_path):
  """The CLI's kl-f8 artifact in the JAX VAE gives the official encoder moments and decode."""
  out = tmp_path / "vae.npz"
  proc = run_convert(official_fixtures, f"--config={TINY_CONFIG}", "--kind=autoencoder",
                     f"--checkpoint={official_fixtures / 'tiny_klf8_autoencoder.ckpt'}",
                     f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  tree, _ = artifacts.load(out)
  model = official_models.abstract_params(official_fixtures)[0]
  ref = np.load(official_fixtures / "tiny_reference.npz")
  nhwc = lambda x: jnp.asarray(np.transpose(x, (0, 2, 3, 1)))
  moments = model.vae.apply({"params": tree["vae"]}, nhwc(ref["mask3"]),
                            method=model.vae.encode_moments)
  np.testing.assert_allclose(moments, nhwc(ref["encoder_moments"]), rtol=1e-4, atol=1e-4)
  scale = jnp.float32(ref["scale_factor"])
  decoded = model.decode(tree["vae"], nhwc(ref["z0"]), scale)
  np.testing.assert_allclose(decoded, nhwc(ref["decoded"]), rtol=1e-4, atol=1e-4)


def test_autoencoder_summary_reports_ignored_keys(official_fixtures):
  """The real kl-f8 file carries loss.* keys: they are ignored, and reported as such."""
  _, _, vae = official_models.abstract_params(official_fixtures)
  state = dict(official_models.state_dict(official_fixtures / "tiny_klf8_autoencoder.ckpt"))
  state["loss.discriminator.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
  _, report = convert.convert_autoencoder(state, vae)
  assert report.ignored == {"loss.discriminator.main.0.weight":
                            "autoencoder training loss (discriminator/LPIPS)"}


def test_wrong_architecture_is_an_error_naming_the_key(official_fixtures, tmp_path):
  """The tiny official checkpoint against the demo architecture: an error, nothing written."""
  out = tmp_path / "x.npz"
  proc = run_convert(official_fixtures, "--config=configs/demo.py", "--kind=sdseg",
                     f"--checkpoint={official_fixtures / 'tiny_sdseg_trained.ckpt'}",
                     f"--out={out}")
  assert proc.returncode == 1
  assert "error:" in proc.stderr and ("shape mismatch" in proc.stderr
                                      or "unexpected keys" in proc.stderr
                                      or "missing" in proc.stderr)
  assert not out.exists()


def test_wrong_kind_is_an_error(official_fixtures, tmp_path):
  proc = run_convert(official_fixtures, f"--config={TINY_CONFIG}", "--kind=autoencoder",
                     f"--checkpoint={official_fixtures / 'tiny_sdseg_trained.ckpt'}",
                     f"--out={tmp_path / 'x.npz'}")
  assert proc.returncode == 1 and "not the kl-f8 autoencoder file" in proc.stderr


def test_corrupt_checkpoint_is_an_error_naming_the_file(official_fixtures, tmp_path):
  bad = tmp_path / "truncated.ckpt"
  data = (official_fixtures / "tiny_klf8_autoencoder.ckpt").read_bytes()
  bad.write_bytes(data[: len(data) // 2])
  proc = run_convert(official_fixtures, f"--config={TINY_CONFIG}", "--kind=autoencoder",
                     f"--checkpoint={bad}", f"--out={tmp_path / 'x.npz'}")
  assert proc.returncode == 1 and "truncated.ckpt" in proc.stderr


def test_shape_mismatch_names_key(official_fixtures):
  _, params, _ = official_models.abstract_params(official_fixtures)
  state = dict(official_models.state_dict(official_fixtures / "tiny_sdseg_trained.ckpt"))
  key = "model.diffusion_model.out.2.weight"
  state[key] = np.zeros((5,) + state[key].shape[1:], np.float32)
  with pytest.raises(convert.ConversionError, match=r"out\.2\.weight"):
    convert.map_module(state, "model.diffusion_model.", params["unet"], "unet",
                       convert.ConversionReport("x"))


def test_loaded_artifact_must_fit_the_model(official_fixtures, tmp_path):
  _, params, _ = official_models.abstract_params(official_fixtures)
  path = tmp_path / "bad.npz"
  artifacts.save(path, {"unet": {"out_2": {"kernel": np.zeros((3, 3, 1, 1), np.float32)}}},
                 {"kind": "ldm_unet"})
  tree, _ = artifacts.load(path)
  with pytest.raises(artifacts.ArtifactError, match="bad.npz"):
    artifacts.check_fits(tree["unet"], params["unet"], "unet", path)
  (tmp_path / "garbage.npz").write_bytes(b"not a zip")
  with pytest.raises(artifacts.ArtifactError, match="garbage.npz"):
    artifacts.load(tmp_path / "garbage.npz")
