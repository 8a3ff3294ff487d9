"""Official PyTorch checkpoints -> sdseg_jax parameter trees, with a full key accounting.

Every tensor of the source checkpoint is either mapped onto a parameter of the target Flax tree
or ignored for a stated reason; any missing, unexpected or mis-shaped tensor is an error naming
the key. The mapping is mechanical because our modules carry the official names:

    torch key  input_blocks.1.0.in_layers.2.weight   (numeric parts join the name before them)
    flax path  input_blocks_1_0 / in_layers_2 / kernel

and the leaf rename depends only on the target leaf: conv `weight` OIHW -> `kernel` HWIO, linear
`weight` (O, I) or Conv1d `weight` (O, I, 1) -> `kernel` (I, O), norm `weight` -> `scale`,
embedding `weight` -> `embedding`.

Supported sources (see `convert_checkpoint`):
  * "autoencoder": the kl-f8 `model.ckpt` (its `loss.*` discriminator/LPIPS keys are ignored),
    giving the frozen VAE and the vision encoder's initial encoder weights;
  * "ldm_unet": an LDM checkpoint such as lsun_churches256 (`model.diffusion_model.*`, 4 input
    channels), widened to the SDSeg input by zero-filling the condition channels;
  * "sdseg": a checkpoint written by official SDSeg training (online or EMA UNet, vision
    encoder, VAE, scale_factor).
"""

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

from flax import traverse_util
import numpy as np

from sdseg_jax import errors

Tree = Dict[str, Any]

_EMA_PREFIX = "model_ema."
_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX_IN_LDM = "first_stage_model."
_VISION_PREFIX = "cond_stage_model."
_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")


class ConversionError(errors.UserFacingError, ValueError):
  """A checkpoint does not fit the configured architecture (missing/unexpected/shape)."""


@dataclasses.dataclass
class ConversionReport:
  """What happened to every source tensor: mapped (source key -> target path) or ignored."""
  source: str
  mapped: Dict[str, str] = dataclasses.field(default_factory=dict)
  ignored: Dict[str, str] = dataclasses.field(default_factory=dict)
  notes: List[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    reasons: Dict[str, int] = {}
    for reason in self.ignored.values():
      reasons[reason] = reasons.get(reason, 0) + 1
    lines = [f"{self.source}: {len(self.mapped)} tensors mapped, {len(self.ignored)} ignored"]
    lines += [f"  ignored {n:5d} x {reason}" for reason, n in sorted(reasons.items())]
    lines += [f"  note: {note}" for note in self.notes]
    return "\n".join(lines)


def torch_key_to_path(key: str) -> Tuple[Tuple[str, ...], str]:
  """'down.0.block.1.conv1.weight' -> (('down_0', 'block_1', 'conv1'), 'weight')."""
  parts: List[str] = []
  for part in key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  return tuple(parts[:-1]), parts[-1]


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  """Re-lays out a PyTorch tensor for a Flax leaf of the given name."""
  if leaf != "kernel":
    return array
  if array.ndim == 4:  # Conv2d OIHW -> HWIO
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 3:  # Conv1d (O, I, 1) used as a per-token linear -> Dense (I, O)
    return array[..., 0].T
  if array.ndim == 2:  # Linear (O, I) -> (I, O)
    return array.T
  raise ConversionError(f"cannot lay out a {array.ndim}-d tensor as a kernel")


def map_module(state: Mapping[str, np.ndarray], prefix: str, target: Tree, what: str,
               report: ConversionReport,
               adapt: Optional[Dict[str, Any]] = None) -> Tree:
  """Maps every `state` key under `prefix` onto the abstract `target` tree (shapes checked).

  `adapt` maps a source key (without prefix) to a function applied to its PyTorch tensor before
  the layout change, e.g. the SDSeg input-channel widening. Keys under `prefix` that match no
  target leaf are errors, and so is any target leaf left without a source tensor.
  """
  adapt = adapt or {}
  flat_target = traverse_util.flatten_dict(target)
  leaf_names = {}
  for path in flat_target:
    leaf_names.setdefault(path[:-1], set()).add(path[-1])
  out: Dict[Tuple[str, ...], np.ndarray] = {}
  unexpected = []
  for key in sorted(state):
    if not key.startswith(prefix):
      continue
    sub_key = key[len(prefix):]
    module_path, leaf = torch_key_to_path(sub_key)
    names = leaf_names.get(module_path, set())
    if leaf == "weight":
      candidates = [n for n in ("kernel", "scale", "embedding") if n in names]
      leaf = candidates[0] if len(candidates) == 1 else None
    elif leaf not in names:
      leaf = None
    if leaf is None:
      unexpected.append(key)
      continue
    path = module_path + (leaf,)
    array = np.asarray(state[key])
    if sub_key in adapt:
      array = adapt[sub_key](array)
    try:
      array = _to_flax(array, leaf)
    except ConversionError as e:
      raise ConversionError(f"{what}: {key}: {e}") from None
    want = tuple(flat_target[path].shape)
    if array.shape != want:
      raise ConversionError(
          f"{what}: shape mismatch for {key}: checkpoint {tuple(state[key].shape)} -> "
          f"{array.shape} after layout change, but the configured model expects {want} at "
          f"{'/'.join(path)}; does the config match the checkpoint's architecture?")
    out[path] = array.astype(np.float32, copy=False)  # float32 sources stay as read
    report.mapped[key] = f"{what}/{'/'.join(path)}"
  if unexpected:
    raise ConversionError(
        f"{what}: {len(unexpected)} checkpoint tensors have no place in the configured model "
        f"(unexpected keys), e.g. {unexpected[:5]}; does the config match the checkpoint?")
  missing = sorted("/".join(p) for p in flat_target if p not in out)
  if missing:
    raise ConversionError(
        f"{what}: {len(missing)} parameters of the configured model are missing from the "
        f"checkpoint under '{prefix}', e.g. {missing[:5]}")
  return traverse_util.unflatten_dict(out)


def widen_input_channels(in_channels: int):
  """SDSeg's UNet initialisation: pretrained filters for z_t, zeros for the condition channels."""

  def widen(weight: np.ndarray) -> np.ndarray:
    extra = in_channels - weight.shape[1]
    if extra < 0:
      raise ConversionError(f"input conv has {weight.shape[1]} input channels, more than the "
                            f"configured {in_channels}")
    pad = np.zeros((weight.shape[0], extra) + weight.shape[2:], weight.dtype)
    return np.concatenate([weight, pad], axis=1)

  return widen


def _ignore_rest(state: Mapping[str, np.ndarray], report: ConversionReport,
                 reasons: List[Tuple[str, str]]) -> None:
  """Records every not-yet-mapped key under the first matching (prefix, reason), else errors."""
  leftover = []
  for key in sorted(state):
    if key in report.mapped:
      continue
    for prefix, reason in reasons:
      if key.startswith(prefix) or key == prefix:
        report.ignored[key] = reason
        break
    else:
      leftover.append(key)
  if leftover:
    raise ConversionError(f"{len(leftover)} checkpoint tensors are neither mapped nor known to be "
                          f"ignorable: {leftover[:8]}; is this the right --kind of checkpoint?")


def _ema_key_map(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """`model_ema.diffusion_model<key without dots>` -> `model.diffusion_model.<key>` tensors.

  LitEma stores each UNet parameter under its name with the dots removed; the dotted names of
  the online UNet in the same checkpoint tell us how to put them back.
  """
  out = {}
  for key in state:
    if key.startswith(_UNET_PREFIX):
      ema_key = _EMA_PREFIX + key[len("model."):].replace(".", "")
      if ema_key in state:
        out[key] = state[ema_key]
  return out


def convert_autoencoder(state: Mapping[str, np.ndarray], vae_target: Tree, *,
                        prefix: str = "", source: str = "autoencoder"
                        ) -> Tuple[Tree, ConversionReport]:
  """kl-f8 autoencoder state_dict -> VAE params (`loss.*` keys are ignored)."""
  report = ConversionReport(source)
  loss_prefix = prefix + "loss."
  model_state = {k: v for k, v in state.items() if not k.startswith(loss_prefix)}
  vae = map_module(model_state, prefix, vae_target, "vae", report)
  _ignore_rest(state, report, [(loss_prefix, "autoencoder training loss (discriminator/LPIPS)")])
  return vae, report


def convert_ldm_unet(state: Mapping[str, np.ndarray], unet_target: Tree,
                     source: str = "ldm_unet") -> Tuple[Tree, ConversionReport]:
  """LDM checkpoint UNet (e.g. lsun_churches256) -> SDSeg UNet params, input conv widened.

  Only `model.diffusion_model.*` is used (not that checkpoint's EMA), as the official SDSeg
  initialisation does. A class embedding of the target (multi-class) is not in such files; it
  is reported as missing, so multi-class models start from a binary SDSeg checkpoint instead.
  """
  report = ConversionReport(source)
  in_channels = unet_target["input_blocks_0_0"]["kernel"].shape[2]
  adapt = {"input_blocks.0.0.weight": widen_input_channels(in_channels)}
  src_in = state.get(_UNET_PREFIX + "input_blocks.0.0.weight")
  unet = map_module(state, _UNET_PREFIX, unet_target, "unet", report, adapt)
  if src_in is not None and src_in.shape[1] != in_channels:
    report.notes.append(f"input conv widened {src_in.shape[1]} -> {in_channels} channels; "
                        "condition channels start at zero (SDSeg initialisation)")
  _ignore_rest(state, report, [
      (_EMA_PREFIX, "EMA weights of the pretrained LDM (SDSeg initialises from the online UNet)"),
      (_VAE_PREFIX_IN_LDM, "the LDM's own first stage (the kl-f8 VAE comes from its own file)"),
      (_VISION_PREFIX, "the LDM's conditioning model (unused by SDSeg)"),
  ] + [(name, "diffusion schedule buffer (recomputed from the config)")
       for name in _SCHEDULE_BUFFERS] + [("scale_factor", "LDM latent scale (SDSeg recomputes "
                                          "it from the masks)")])
  return unet, report


def convert_sdseg(state: Mapping[str, np.ndarray], unet_target: Tree, vision_target: Tree,
                  vae_target: Tree, *, use_ema: bool = True,
                  schedule_betas: Optional[np.ndarray] = None,
                  source: str = "sdseg") -> Tuple[Dict[str, Any], ConversionReport]:
  """A checkpoint written by official SDSeg training -> {unet, vision_encoder, vae, scale_factor}.

  `use_ema` picks the EMA UNet (what the official evaluation uses) or the online one. When
  `schedule_betas` is given, the checkpoint's `betas` buffer must match it.
  """
  report = ConversionReport(source)
  if use_ema:
    ema = _ema_key_map(state)
    if not ema:
      raise ConversionError(f"{source}: no `model_ema.*` UNet in this checkpoint; convert the "
                            "online UNet instead (use_ema=False / --no-ema)")
    unet_report = ConversionReport(source)
    unet = map_module(ema, _UNET_PREFIX, unet_target, "unet", unet_report)
    for key, dest in unet_report.mapped.items():
      report.mapped[_EMA_PREFIX + key[len("model."):].replace(".", "")] = dest
  else:
    unet = map_module(state, _UNET_PREFIX, unet_target, "unet", report)
  vision = map_module(state, _VISION_PREFIX, vision_target, "vision_encoder", report)
  vae = map_module(state, _VAE_PREFIX_IN_LDM, vae_target, "vae", report)
  if "scale_factor" not in state:
    raise ConversionError(f"{source}: no `scale_factor` in this checkpoint; it is not an "
                          "SDSeg training checkpoint")
  scale_factor = float(np.asarray(state["scale_factor"]))
  report.mapped["scale_factor"] = "scale_factor"
  if schedule_betas is not None and "betas" in state:
    if not np.allclose(np.asarray(state["betas"]), schedule_betas, rtol=1e-5, atol=1e-8):
      raise ConversionError(f"{source}: the checkpoint's diffusion schedule (`betas`) differs "
                            "from the configured model.schedule")
    report.notes.append("diffusion schedule (betas) matches the config")
  _ignore_rest(state, report, [
      (_UNET_PREFIX, "online UNet (the EMA UNet was converted)"),
      (_EMA_PREFIX, "EMA UNet / EMA bookkeeping (the online UNet was converted)"
       if not use_ema else "EMA bookkeeping (decay, num_updates)"),
  ] + [(name, "diffusion schedule buffer (recomputed from the config)")
       for name in _SCHEDULE_BUFFERS])
  return {"unet": unet, "vision_encoder": vision, "vae": vae,
          "scale_factor": np.float32(scale_factor)}, report
