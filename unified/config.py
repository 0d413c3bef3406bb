"""Dataclass configs and named presets (configs/*.toml).

A preset is a TOML file whose tables mirror `ColaConfig`'s fields; anything left out keeps the
dataclass default, and `base = "NAME"` inherits another preset, so a preset states only what
differs. Command-line overrides use dotted keys: `--set optim.lr=3e-4`. Every value is checked
against its field's type at load (enumerations are `Literal`s), with a message naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from unified.layout import TextLayoutConfig, TimeConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# The MLP activation of new models. Exact GELU is the same curve as DiT's tanh approximation
# within 5e-4 and, in eager PyTorch on CPU, 4.6x faster (a [256, 2048] tensor: 104 vs 481 us),
# about a tenth of a generation step (bench/generation.py). Models saved with "gelu_tanh" keep
# it: the activation is in their config.json.
ACT = "gelu"
Activation = Literal["gelu", "gelu_tanh"]


@dataclass
class VAEConfig:
    vocab_size: int = 4096
    latent_dim: int = 16
    patch_size: int = 1
    width: int = 256
    enc_layers: int = 2
    dec_layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    act: Activation = ACT  # MLP activation: "gelu" (exact) or "gelu_tanh" (DiT's approximation)
    # an existing Hugging Face tokenizer folder to use instead of training a BPE in stage 1
    # (special tokens found by name, missing ones added; the vocabulary is its size)
    tokenizer: str = ""


@dataclass
class PriorConfig:
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    attn_backend: Literal["auto", "xformers", "sdpa", "reference"] = "auto"
    act: Activation = ACT  # MLP activation: "gelu" (exact) or "gelu_tanh" (DiT's approximation)


@dataclass
class ModelConfig:
    """Which model the trainer builds: "cola" (Text VAE + prior, the two stages) or a baseline
    that shares the tokenizer, data pipeline and trainer (unified/baselines.py): "ar" (a
    causal transformer LM) or "mdlm" (a masked discrete diffusion LM). The sizes below are
    the baselines' (Cola's are [vae] and [prior])."""

    kind: Literal["cola", "ar", "mdlm"] = "cola"
    width: int = 256
    depth: int = 11
    heads: int = 4
    intermediate: int = 688  # SwiGLU hidden size (~8/3 width: ~12 width^2 per layer, as the DiT)


@dataclass
class LossConfig:
    beta: float = 0.01  # KL(q || N(0, I)) weight
    lambda_mask: float = 1.0  # BERT-style masked-token CE weight
    mask_prob: float = 0.15
    decoder_noise: float = 0.15  # decoder sees latents noised to t ~ U(0, this)
    lambda_vae: float = 1.0  # stage 2: weight of the VAE terms
    lambda_fm: float = 1.0  # stage 2: flow-matching weight
    lambda_ref: float = 0.1  # stage 2: KL(q_phi || q_phi_ref) to the frozen stage-1 encoder
    sample_posterior: bool = True  # z ~ q(z|x); False uses the mean (deterministic ablation)
    # stage 2, text-to-text: weight of the token cross-entropy of the prior's clean estimate
    # z0_hat = z_t - t v of every noisy text latent, read by the Text VAE decoder with its
    # weights detached (Diffusion-LM's rounding loss, Li et al. 2022): a discrete signal for
    # which token the flow should land on. 0 = off (the paper's objective)
    lambda_x0_ce: float = 0.0
    image_kl_weight: float = 1e-3  # stage 1: KL weight of the image VAE (per-pixel normalized)
    # stage 2: weight of each task's flow loss in L_FM (tasks not named weigh 1)
    task_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageConfig:
    """The image side: the image VAE and how its latents enter the prior."""

    pretrained: str = ""  # a local diffusers AutoencoderKL folder; "" = train a small one
    size: int = 32  # training images are resized to size x size
    latent_channels: int = 4
    widths: tuple[int, ...] = (32, 64, 64)  # 2^(len - 1) downsampling
    patch_size: int = 2  # latent patch -> one prior token of latent_channels * p * p values
    time: TimeConfig = TimeConfig(loc=0.0, scale=1.0)  # logit-normal training time of image tokens
    lr_mult: float = 1.0  # stage 1: image VAE learning rate multiplier
    flip: bool = False  # training: mirror half of the images (not for captions saying "left")


@dataclass
class TasksConfig:
    """The task mixture of the image-text samples (each sample goes to one task)."""

    ratios: dict[str, float] = field(default_factory=lambda: {"image_to_text": 0.5,
                                                                "text_to_image": 0.5})
    question_prob: float = 0.0  # image-to-text: share of samples that ask a question (VQA)
    caption_prefix_prob: float = 0.2  # image-to-text: share that give a random caption prefix


@dataclass
class DataConfig:
    # train / pairs: shards (a folder, a file list, a brace pattern or any URL webdataset reads)
    # or a table {source: ratio} of several shard sources, mixed by ratio
    train: str | dict[str, float] = "data/stdlib/train"
    heldout: str = "data/stdlib/heldout"
    seq_len: int = 256
    batch_size: int = 16  # packed prose rows per step (text-to-text), global
    pairs: str | dict[str, float] = ""  # image-text shards (img2dataset layout); "" = text only
    pairs_heldout: str = ""
    pair_batch_size: int = 0  # image-text samples per step, global
    tokenizer_docs: int = 20000  # documents used to train the BPE in stage 1
    shuffle_buffer: int = 1000  # samples mixed across drawn shards (a shard reads in order)
    caption_key: str = ""  # "" = the caption is KEY.txt; else this key of KEY.json
    long_captions: Literal["truncate", "skip"] = "truncate"  # a caption longer than fits
    max_bad_samples: int = 1000  # unusable samples in a row before a stream stops the run
    workers: int = 0  # DataLoader processes decoding the images of this rank's slices
    # aspect-ratio buckets (width / height, e.g. [0.5, 1.0, 2.0]): each training image goes to
    # the nearest, about image.size^2 pixels, one bucket per batch (unified/data/buckets.py);
    # empty = off (one square bucket)
    buckets: tuple[float, ...] = ()


@dataclass
class OptimConfig:
    name: str = "adamw"  # or any timm optimizer name, e.g. "muon" (timm create_optimizer_v2)
    lr: float = 1e-3
    vae_lr_mult: float = 1.0  # stage 2: the paper's best joint setting is x1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (data.batch_size is the global batch)


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 25
    ckpt_every: int = 250
    keep: int = 2  # checkpoints kept
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast or fp32 (never fp16 on CPU)
    device: str = "auto"
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    ema_decay: float = 0.0  # stage 2: EMA of the prior (0 = off); the export uses the EMA
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded)
    # stage 2: torch.compile the prior's blocks (DiT.compile_blocks: the element-wise chains
    # around attention and the matmuls fused); the first steps pay the compilation
    compile: bool = False
    # this stage's global batch, when it differs from data.batch_size / data.pair_batch_size
    # (e.g. more prose rows for the Text VAE in stage 1 than the prior needs in stage 2)
    batch_size: int | None = None
    pair_batch_size: int | None = None
    # held-out loss (data.heldout prose, data.pairs_heldout task samples) every this many
    # steps, on eval_batches global batches drawn once (0 = off)
    eval_every: int = 0
    eval_batches: int = 4
    # stage 2, rank 0: sample captions of fixed held-out images and images of fixed held-out
    # captions (data.pairs_heldout) into TensorBoard every this many steps (None: with each
    # checkpoint; 0: off), with the EMA prior (unified/training/samples.py)
    log_samples_every: int | None = None
    log_samples: int = 2  # images and captions each time


@dataclass
class ColaConfig:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    layout: TextLayoutConfig = field(default_factory=TextLayoutConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class ConfigError(ValueError):
    """A preset or override that does not fit the config: the message names the key."""


_LEGACY = {  # old key -> its one home now (presets written before the move still load)
    ("layout", "time_loc"): ("layout", "time", "loc"),
    ("layout", "time_scale"): ("layout", "time", "scale"),
    ("image", "time_loc"): ("image", "time", "loc"),
    ("image", "time_scale"): ("image", "time", "scale"),
    ("tasks", "cond_drop_prob"): ("layout", "cond_drop_prob"),
}


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    values = copy.deepcopy(values)
    for (section, key), new in _LEGACY.items():
        node = values.get(section)
        if isinstance(node, dict) and key in node:
            val = node.pop(key)
            dst = values
            for part in new[:-1]:
                dst = dst.setdefault(part, {})
            dst.setdefault(new[-1], val)
    return values


def _describe(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             type(None): "nothing (null)"}
    if tp in names:
        return names[tp]
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return "a list"
    if get_origin(tp) is dict:
        return "a table of name = number"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """`value` checked against the field type `tp` (and converted where lossless: an integer
    for a float, a list for a tuple); ConfigError naming `key` otherwise."""
    origin = get_origin(tp)

    def fail():
        raise ConfigError(f"config key {key}: expected {_describe(tp)}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} is a section (set {key}.<field>=...), got the "
                              f"value {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if isinstance(value, bool) or value not in get_args(tp):
            fail()
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        fail()
    if tp is type(None):
        return value if value is None else fail()
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            fail()
        return float(value)
    if tp is str:
        return value if isinstance(value, str) else fail()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail()
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        kt, vt = get_args(tp)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    return value


def _build(cls, values: dict[str, Any], prefix: str = ""):
    """Instantiate a (nested) dataclass from a dict: unknown keys refused, every value
    type- and enum-checked against its field's annotation, with a message naming the key."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, val in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"unknown config key {name!r}; known in this section: "
                              f"{', '.join(sorted(known))}")
        kwargs[key] = _coerce(val, hints[key], name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a dataclass's own check (__post_init__)
        raise ConfigError(f"config section {prefix or cls.__name__}: {e}") from None


def from_dict(values: dict[str, Any]) -> ColaConfig:
    return _build(ColaConfig, _migrate(values))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        node = values
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
        node[leaf] = _parse_value(raw.strip())
    return values


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (tables merge, values replace)."""
    out = dict(base)
    for key, val in over.items():
        out[key] = _merge(out[key], val) if isinstance(val, dict) and isinstance(
            out.get(key), dict) else val
    return out


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _preset_path(name: str) -> Path:
    path = Path(name)
    if not path.suffix:
        path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset {name!r}; available: {', '.join(preset_names())}")
    return path


def preset_values(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw values of a preset with its `base` chain resolved (a preset names the preset
    it inherits from with `base = "NAME"` and states only what differs from it)."""
    path = _preset_path(name)
    if str(path) in _seen:
        raise ConfigError(f"presets inherit in a circle: {' -> '.join((*_seen, str(path)))}")
    try:
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a valid {path.suffix[1:].upper()} file ({e})") from None
    base = values.pop("base", None)
    values = _migrate(values)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a preset name, got {base!r}")
        parent = preset_values(base, (*_seen, str(path)))
        parent.pop("name", None)  # a preset is named after itself, not its base
        values = _merge(parent, values)
    return values


def load_preset(name: str, overrides: list[str] | None = None) -> ColaConfig:
    """A named preset from configs/ (or a path to a .toml/.json file), its base chain, plus
    overrides; every value checked (ConfigError names the key)."""
    values = preset_values(name)
    values.setdefault("name", _preset_path(name).stem)
    return from_dict(apply_overrides(values, overrides or []))
