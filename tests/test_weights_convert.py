"""weights/convert.py on tiny hand-made state dicts: key mapping, layouts, accounting, errors.

The official-checkpoint tests (test_convert_cli.py, test_official_parity.py) show that real
checkpoints convert; these pin each rule with numbers written by hand (a conv OIHW tensor must
come out HWIO, the widened input conv must hold zeros, every ignored key has its reason) and run
in well under a second, which also makes them the mutation-testing subset of convert.py.
"""

import jax
import numpy as np
import pytest

from sdseg_jax.weights import convert


def _arange(*shape):
  return np.arange(np.prod(shape), dtype=np.float64).reshape(shape) + 1.0


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, np.float32)


def test_torch_key_to_path_joins_numeric_parts_to_the_name_before():
  assert convert.torch_key_to_path("down.0.block.1.conv1.weight") == (
      ("down_0", "block_1", "conv1"), "weight")
  assert convert.torch_key_to_path("input_blocks.1.0.in_layers.2.bias") == (
      ("input_blocks_1_0", "in_layers_2"), "bias")
  assert convert.torch_key_to_path("0.weight") == (("0",), "weight")
  assert convert.torch_key_to_path("scale") == ((), "scale")


TARGET = {
    "conv_in": {"kernel": _spec(3, 2, 2, 4), "bias": _spec(4)},   # Conv2d (4, 2, 3, 2)
    "norm": {"scale": _spec(4), "bias": _spec(4)},
    "emb": {"embedding": _spec(5, 4)},
    "proj": {"kernel": _spec(4, 6)},                               # Conv1d (6, 4, 1)
    "block_1": {"lin": {"kernel": _spec(4, 3), "bias": _spec(3)}},  # Linear (3, 4)
}


def _state(prefix="m."):
  return {
      prefix + "conv_in.weight": _arange(4, 2, 3, 2), prefix + "conv_in.bias": _arange(4),
      prefix + "norm.weight": _arange(4), prefix + "norm.bias": -_arange(4),
      prefix + "emb.weight": _arange(5, 4), prefix + "proj.weight": _arange(6, 4, 1),
      prefix + "block.1.lin.weight": _arange(3, 4), prefix + "block.1.lin.bias": _arange(3),
  }


def test_map_module_renames_and_lays_out_every_leaf():
  state = dict(_state(), **{"other.weight": np.zeros(1)})
  report = convert.ConversionReport("src")
  out = convert.map_module(state, "m.", TARGET, "what", report)
  np.testing.assert_array_equal(out["conv_in"]["kernel"],
                                _arange(4, 2, 3, 2).transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(out["conv_in"]["bias"], _arange(4))
  np.testing.assert_array_equal(out["norm"]["scale"], _arange(4))
  np.testing.assert_array_equal(out["norm"]["bias"], -_arange(4))
  np.testing.assert_array_equal(out["emb"]["embedding"], _arange(5, 4))
  np.testing.assert_array_equal(out["proj"]["kernel"], _arange(6, 4, 1)[:, :, 0].T)
  np.testing.assert_array_equal(out["block_1"]["lin"]["kernel"], _arange(3, 4).T)
  assert {leaf.dtype for d in (out["conv_in"], out["proj"], out["norm"]) for leaf in d.values()
          } == {np.dtype(np.float32)}
  assert report.mapped["m.conv_in.weight"] == "what/conv_in/kernel"
  assert report.mapped["m.block.1.lin.bias"] == "what/block_1/lin/bias"
  assert len(report.mapped) == 8 and "other.weight" not in report.mapped


def test_map_module_applies_adapt_before_the_layout_change():
  adapt = {"conv_in.weight": lambda w: w[:, :1] * 0 + 7}
  target = dict(TARGET, conv_in={"kernel": _spec(3, 2, 1, 4), "bias": _spec(4)})
  out = convert.map_module(_state(), "m.", target, "x", convert.ConversionReport("s"), adapt)
  assert out["conv_in"]["kernel"].shape == (3, 2, 1, 4) and (out["conv_in"]["kernel"] == 7).all()


def test_unexpected_missing_and_mis_shaped_tensors_are_errors_naming_the_key():
  report = convert.ConversionReport("s")
  extra = dict(_state(), **{"m.ghost.weight": np.zeros(2), "m.norm.running_mean": np.zeros(4)})
  with pytest.raises(convert.ConversionError,
                     match=r"what: 2 checkpoint tensors have no place in the configured model "
                           r"\(unexpected keys\), e\.g\. \['m\.ghost\.weight', "
                           r"'m\.norm\.running_mean'\]"):
    convert.map_module(extra, "m.", TARGET, "what", report)
  partial = {k: v for k, v in _state().items() if not k.startswith("m.norm")}
  with pytest.raises(convert.ConversionError,
                     match=r"what: 2 parameters of the configured model are missing from the "
                           r"checkpoint under 'm\.', e\.g\. \['norm/bias', 'norm/scale'\]"):
    convert.map_module(partial, "m.", TARGET, "what", report)
  wrong = dict(_state(), **{"m.block.1.lin.weight": _arange(4, 4)})
  with pytest.raises(convert.ConversionError,
                     match=r"what: shape mismatch for m\.block\.1\.lin\.weight: checkpoint "
                           r"\(4, 4\) -> \(4, 4\) after layout change, but the configured model "
                           r"expects \(4, 3\) at block_1/lin/kernel"):
    convert.map_module(wrong, "m.", TARGET, "what", report)


def test_a_weight_matching_two_leaf_kinds_is_unexpected():
  target = {"odd": {"kernel": _spec(2, 2), "scale": _spec(2)}}
  with pytest.raises(convert.ConversionError, match=r"\['m\.odd\.weight'\]"):
    convert.map_module({"m.odd.weight": np.zeros((2, 2))}, "m.", target, "w",
                       convert.ConversionReport("s"))


def test_kernel_of_unsupported_rank_is_an_error_naming_the_key():
  with pytest.raises(convert.ConversionError,
                     match=r"what: m\.k\.weight: cannot lay out a 1-d tensor as a kernel"):
    convert.map_module({"m.k.weight": np.zeros(3)}, "m.", {"k": {"kernel": _spec(3)}}, "what",
                       convert.ConversionReport("s"))


def test_widen_input_channels_appends_zero_filters():
  w = _arange(4, 2, 3, 3)
  wide = convert.widen_input_channels(5)(w)
  assert wide.shape == (4, 5, 3, 3) and wide.dtype == w.dtype
  np.testing.assert_array_equal(wide[:, :2], w)
  assert (wide[:, 2:] == 0).all()
  np.testing.assert_array_equal(convert.widen_input_channels(2)(w), w)
  assert convert.widen_input_channels(3)(w.astype(np.float32)).dtype == np.float32
  with pytest.raises(convert.ConversionError,
                     match="input conv has 2 input channels, more than the configured 1"):
    convert.widen_input_channels(1)(w)


def test_summary_counts_mapped_and_ignored_by_reason():
  report = convert.ConversionReport("ckpt", mapped={"a": "x/a", "b": "x/b"},
                                    ignored={"l1": "loss", "l2": "loss", "e": "ema"},
                                    notes=["widened"])
  assert report.summary() == ("ckpt: 2 tensors mapped, 3 ignored\n"
                              "  ignored     1 x ema\n"
                              "  ignored     2 x loss\n"
                              "  note: widened")


def test_convert_autoencoder_ignores_only_the_loss_keys():
  state = dict(_state(prefix="first."), **{"first.loss.disc.weight": np.zeros(3),
                                          "first.loss.logvar": np.zeros(())})
  vae, report = convert.convert_autoencoder(state, TARGET, prefix="first.", source="ae")
  np.testing.assert_array_equal(vae["emb"]["embedding"], _arange(5, 4))
  assert report.source == "ae" and len(report.mapped) == 8
  assert report.mapped["first.emb.weight"] == "vae/emb/embedding"
  assert report.ignored == {k: "autoencoder training loss (discriminator/LPIPS)"
                            for k in ("first.loss.disc.weight", "first.loss.logvar")}
  default_vae, default_report = convert.convert_autoencoder(_state(prefix=""), TARGET)
  assert default_report.source == "autoencoder" and set(default_vae) == set(TARGET)
  with pytest.raises(convert.ConversionError,
                     match=r"1 checkpoint tensors are neither mapped nor known to be ignorable: "
                           r"\['stray'\]; is this the right --kind of checkpoint\?"):
    convert.convert_autoencoder(dict(_state(prefix="first."), stray=np.zeros(1)), TARGET,
                                prefix="first.")


UNET = {"input_blocks_0_0": {"kernel": _spec(3, 3, 6, 2), "bias": _spec(2)},
        "out_2": {"kernel": _spec(2, 2)}}


def _unet_state(prefix="model.diffusion_model.", in_channels=4):
  return {prefix + "input_blocks.0.0.weight": _arange(2, in_channels, 3, 3),
          prefix + "input_blocks.0.0.bias": _arange(2), prefix + "out.2.weight": _arange(2, 2)}


def test_convert_ldm_unet_widens_and_ignores_the_rest_with_reasons():
  state = dict(_unet_state(), **{
      "model_ema.decay": np.zeros(()), "first_stage_model.x": np.zeros(1),
      "cond_stage_model.y": np.zeros(1), "betas": np.zeros(3), "logvar": np.zeros(3),
      "scale_factor": np.ones(())})
  unet, report = convert.convert_ldm_unet(state, UNET)
  kernel = unet["input_blocks_0_0"]["kernel"]
  np.testing.assert_array_equal(kernel[:, :, :4], _arange(2, 4, 3, 3).transpose(2, 3, 1, 0))
  assert (kernel[:, :, 4:] == 0).all()
  assert report.source == "ldm_unet"
  assert report.notes == ["input conv widened 4 -> 6 channels; condition channels start at zero "
                          "(SDSeg initialisation)"]
  assert report.ignored["model_ema.decay"].startswith("EMA weights of the pretrained LDM")
  assert report.ignored["first_stage_model.x"].startswith("the LDM's own first stage")
  assert report.ignored["cond_stage_model.y"] == "the LDM's conditioning model (unused by SDSeg)"
  assert report.ignored["betas"] == report.ignored["logvar"] == (
      "diffusion schedule buffer (recomputed from the config)")
  assert report.ignored["scale_factor"] == ("LDM latent scale (SDSeg recomputes it from the "
                                            "masks)")
  assert report.mapped["model.diffusion_model.out.2.weight"] == "unet/out_2/kernel"
  _, same_width = convert.convert_ldm_unet(_unet_state(in_channels=6), UNET, source="x")
  assert same_width.notes == [] and same_width.source == "x"


def _sdseg_state():
  state = dict(_unet_state(in_channels=6))
  for key, value in _unet_state(in_channels=6).items():  # LitEma: dots removed, values differ
    state["model_ema." + key[len("model."):].replace(".", "")] = value + 100.0
  state.update({"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(7)})
  state.update(_state(prefix="cond_stage_model."))
  state.update(_state(prefix="first_stage_model."))
  state.update({"scale_factor": np.float32(0.25), "betas": np.array([0.1, 0.2], np.float32),
                "alphas_cumprod": np.zeros(2, np.float32)})
  return state


@pytest.mark.parametrize("use_ema", [True, False])
def test_convert_sdseg_picks_the_ema_or_online_unet(use_ema):
  out, report = convert.convert_sdseg(_sdseg_state(), UNET, TARGET, TARGET, use_ema=use_ema,
                                      schedule_betas=np.array([0.1, 0.2]))
  offset = 100.0 if use_ema else 0.0
  np.testing.assert_array_equal(out["unet"]["out_2"]["kernel"], _arange(2, 2).T + offset)
  np.testing.assert_array_equal(out["vision_encoder"]["proj"]["kernel"],
                                _arange(6, 4, 1)[:, :, 0].T)
  np.testing.assert_array_equal(out["vae"]["norm"]["bias"], -_arange(4))
  assert out["scale_factor"] == np.float32(0.25) and out["scale_factor"].dtype == np.float32
  assert report.mapped["scale_factor"] == "scale_factor"
  assert report.mapped["cond_stage_model.emb.weight"] == "vision_encoder/emb/embedding"
  assert report.mapped["first_stage_model.emb.weight"] == "vae/emb/embedding"
  assert report.notes == ["diffusion schedule (betas) matches the config"]
  assert report.ignored["alphas_cumprod"] == (
      "diffusion schedule buffer (recomputed from the config)")
  if use_ema:
    assert report.mapped["model_ema.diffusion_modelout2weight"] == "unet/out_2/kernel"
    assert report.ignored["model.diffusion_model.out.2.weight"] == (
        "online UNet (the EMA UNet was converted)")
    assert report.ignored["model_ema.decay"] == "EMA bookkeeping (decay, num_updates)"
  else:
    assert report.mapped["model.diffusion_model.out.2.weight"] == "unet/out_2/kernel"
    assert report.ignored["model_ema.diffusion_modelout2weight"] == (
        "EMA UNet / EMA bookkeeping (the online UNet was converted)")
  assert len(report.mapped) + len(report.ignored) == len(_sdseg_state())
  assert report.source == "sdseg"


def test_convert_sdseg_errors():
  state = _sdseg_state()
  no_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.diffusion")}
  with pytest.raises(convert.ConversionError, match=r"src: no `model_ema\.\*` UNet in this "
                                                    r"checkpoint; convert the online UNet"):
    convert.convert_sdseg(no_ema, UNET, TARGET, TARGET, source="src")
  out, _ = convert.convert_sdseg(no_ema, UNET, TARGET, TARGET, use_ema=False)
  assert set(out) == {"unet", "vision_encoder", "vae", "scale_factor"}
  no_scale = {k: v for k, v in state.items() if k != "scale_factor"}
  with pytest.raises(convert.ConversionError, match=r"src: no `scale_factor` in this checkpoint; "
                                                    "it is not an SDSeg training checkpoint"):
    convert.convert_sdseg(no_scale, UNET, TARGET, TARGET, source="src")
  with pytest.raises(convert.ConversionError, match=r"src: the checkpoint's diffusion schedule "
                                                    r"\(`betas`\) differs from the configured"):
    convert.convert_sdseg(state, UNET, TARGET, TARGET, source="src",
                          schedule_betas=np.array([0.1, 0.2 + 1e-5]))
  _, tolerant = convert.convert_sdseg(state, UNET, TARGET, TARGET,
                                      schedule_betas=np.array([0.1, 0.2 * (1 + 1e-7)]))
  assert tolerant.notes
  _, unchecked = convert.convert_sdseg(state, UNET, TARGET, TARGET)
  assert unchecked.notes == []


def test_long_key_lists_are_cut_to_a_few_examples():
  report = convert.ConversionReport("s")
  ghosts = {f"m.ghost{i}.weight": np.zeros(1) for i in range(7)}
  with pytest.raises(convert.ConversionError) as e:
    convert.map_module(dict(_state(), **ghosts), "m.", TARGET, "w", report)
  assert str(sorted(ghosts)[:5]) + ";" in str(e.value)
  wide = {f"l{i}": {"kernel": _spec(2, 2)} for i in range(7)}
  with pytest.raises(convert.ConversionError) as e:
    convert.map_module({}, "m.", wide, "w", report)
  assert "e.g. " + str([f"l{i}/kernel" for i in range(5)]) in str(e.value)
  strays = {f"stray{i}": np.zeros(1) for i in range(10)}
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_autoencoder(dict(_state(prefix="f."), **strays), TARGET, prefix="f.")
  assert "ignorable: " + str(sorted(strays)[:8]) + ";" in str(e.value)
