"""One config loader for every stage: dataclass defaults <- YAML preset <- dotted overrides.

The dataclass defaults are the paper's (``base``) settings; presets in ``configs/``
override only what differs. Unknown keys, wrongly typed values and values outside a key's
allowed set (``config_rules.RULES``) are errors that name the key and where the value came from (the
file or "command line"), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hsissl import config_rules
from hsissl.config_rules import ConfigError

# The global batch at which pretraining rates are stated: rate = lr x global batch / 256, the
# linear scaling rule of MAE (He et al.) and DINOv2 (Oquab et al.).
LR_REFERENCE_BATCH = 256


@dataclass
class SyntheticConfig:
    """The generated WHU-OHS-layout dataset (``hsissl make-synthetic``)."""

    scenes: dict[str, int] = field(default_factory=lambda: {"tr": 8, "va": 2, "ts": 4})
    size: int = 512  # scene side in pixels (WHU-OHS: 512)
    seed: int = 0
    noise: float = 0.04  # per-pixel noise, as a fraction of reflectance
    unlabelled_fraction: float = 0.15  # share of regions left as label 0


@dataclass
class DataConfig:
    """Where scenes come from and how they are tiled and sharded."""

    source: str = ""  # WHU-OHS-layout folder or .mat folder; "" = the generated dataset
    name: str = "whu-ohs"  # dataset name under <storage>/datasets/
    splits: list[str] = field(default_factory=lambda: ["tr", "va", "ts"])
    scene_size: int | None = 512  # required scene side; None accepts any size >= tile_size
    tile_size: int = 64
    stride: int = 64
    drop_unlabelled: bool = False  # drop tiles without one labelled pixel
    shard_tiles: int = 1024  # tiles per shard: 1024 x 32 x 64 x 64 int16 = 256 MiB
    readers: int = 2  # threads reading scenes ahead of the tiler
    # Scenes named in two splits, identical tiles in two splits or overlapping georeferenced
    # footprints across splits refuse the ingest (data/leakage.py) unless this is true; the
    # overlap is then recorded in the manifest.
    allow_split_overlap: bool = False


@dataclass
class StorageConfig:
    uri: str = (
        ""  # artifact store root: path, file://… or s3://bucket/prefix; "" = <run_dir>/artifacts
    )


@dataclass
class TrackingConfig:
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "hsissl"
    # Encoders are registered as models <prefix><method> (hsissl.registry); "" = not at all.
    model_prefix: str = "hsissl-"


@dataclass
class PretrainConfig:
    """Trainer machinery shared by every pretraining method (hsissl.methods)."""

    name: str = ""  # checkpoints go to <store>/checkpoints/<name or method>/
    batch_size: int = 128  # per device
    epochs: float = 100.0  # passes over the training tiles
    max_steps: int = 0  # > 0 overrides epochs
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False  # torch.compile the training module
    # With compile: capture the networks whose shapes never change (MAE's model) in CUDA graphs
    # (torch.compile mode "reduce-overhead"): less launch overhead. MAE on an H200: end to end
    # 6,765 -> 8,495 img/s (docs/benchmarks.md). DINOv2/SS-ViT change shapes every step: ignored.
    cuda_graphs: bool = False
    ckpt_every: int = 500  # steps between resumable checkpoints (and one at the end)
    log_every: int = 20
    knn_every: int = 0  # steps between k-NN probes on labelled val tiles; 0 = only at the end
    knn_k: int = 20
    knn_tiles: int = 2048  # tiles per side (bank from tr, queries from va)
    deterministic: bool = False  # bit-reproducible kernels (slower)
    loader_threads: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Recompute the first N transformer blocks of each backbone in backward instead of keeping
    # their activations: less GPU memory for about N/depth of a forward pass more compute.
    checkpoint_blocks: int = 0


@dataclass
class OptimConfig:
    """What every pretraining method's section has (the trainer reads these)."""

    model: str = ""  # factory in hsissl.models; "" = the method's default (hsissl.methods)
    # base learning rate: the peak after warmup is lr x global batch / LR_REFERENCE_BATCH
    # (scaled_lr); 3e-4 gives 1.5e-4 at the default 128 per device on one device
    lr: float = 3e-4
    min_lr: float = 1e-6  # cosine schedule floor
    warmup_fraction: float = 0.05
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float = 3.0  # max grad norm; 0 = off
    drop_rate: float = 0.1  # dropout (the dissertation's 0.1)

    def scaled_lr(self, global_batch: int) -> float:
        """The peak learning rate at ``global_batch`` (per-device batch x world size)."""
        return self.lr * global_batch / LR_REFERENCE_BATCH


@dataclass
class MAEConfig(OptimConfig):
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class DINOv2Config(OptimConfig):
    lr: float = 1e-3  # base: 5e-4 at the default 128 per device on one device
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.04
    drop_rate: float = 0.0
    out_dim: int = 65536  # prototypes
    head_hidden: int = 2048
    head_bottleneck: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_warmup: float = 0.04  # start of the linear teacher-temperature warm-up
    teacher_temp_warmup_fraction: float = 0.3
    momentum_teacher: float = 0.992  # EMA momentum, cosine schedule to 1.0
    centering: str = "sinkhorn"  # sinkhorn | center
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # iBOT per-image range
    mask_probability: float = 0.5  # share of images with masked patches
    n_local_crops: int = 8
    local_size: int = 32
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])


@dataclass
class SSViTConfig(DINOv2Config):
    spatial_weight: float = 1.0  # loss weights of the two streams
    spectral_weight: float = 1.0
    spectral_mask_ratio: float = 0.25  # share of band-pair tokens masked in the spectral stream


@dataclass
class FinetuneConfig:
    """A segmentation head on a frozen encoder (the dissertation's runs 1-9)."""

    encoder: str = ""  # encoder record URI, or random:<factory> for the random-init control
    head: str = "linear"  # linear (multiscale) | conv (UNet-like) | segmenter (mask transformer)
    name: str = ""  # results go to <store>/results/<name>; "" = finetune-<encoder>-<head>
    n_blocks: int = 4  # last blocks whose patch tokens feed the head
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    class_weights: bool = False  # inverse-frequency weights from the manifest's class counts
    lr: float = 1e-4
    poly_power: float = 0.9
    weight_decay: float = 0.01
    batch_size: int = 64
    epochs: float = 20.0
    max_steps: int = 0  # > 0 overrides epochs
    eval_split: str = "ts"
    eval_scenes: int = 0  # whole scenes evaluated by sliding window; 0 = all in eval_split
    # whole-scene evaluation: windows at this stride (below the tile, so they overlap), their
    # logits blended with a Gaussian weight toward each window's centre (no seams; uniform = mean)
    eval_stride: int = 32
    eval_blend: str = "gaussian"  # gaussian | uniform (hsissl.segment.sliding)
    segmenter_depth: int = 2
    segmenter_heads: int = 12
    loader_threads: int = 4


@dataclass
class BaselineConfig:
    """DeepLabV3+ (ResNet-50 V1c encoder, FCN auxiliary head) from scratch on whole scenes."""

    name: str = "baseline-deeplabv3plus"
    encoder: str = "resnet50c"  # timm name; resnet50c = ResNet-50 V1c (deep 3x3 stem)
    batch_size: int = 8  # whole scenes
    epochs: float = 50.0
    max_steps: int = 0
    lr: float = 1e-3
    poly_power: float = 0.9
    weight_decay: float = 1e-4
    aux_weight: float = 0.4  # FCN auxiliary head loss weight
    crop_size: int = 0  # random crops of this side for training; 0 = whole scenes
    eval_split: str = "ts"


@dataclass
class PCAConfig:
    """The dissertation's proof of concept: PCA 32 -> 3 bands + reconstruction checks."""

    name: str = "pca-poc"
    components: int = 3
    fit_pixels: int = 200_000  # random training pixels the PCA is fitted on
    encoder: str = ""  # optional frozen 32-band MAE encoder record for the reconstruction check
    decoder: str = "conv"  # conv | vit (a 3-channel ViT + linear patch decoder)
    vit_model: str = "vit_base_patch8_64"  # the 3-channel ViT of decoder=vit
    decoder_steps: int = 500  # steps training the 3-band -> 32-band decoder
    batch_size: int = 64
    lr: float = 1e-3


@dataclass
class ReportConfig:
    name: str = "report"
    results: list[str] = field(
        default_factory=list
    )  # result folders; [] = every results/* in the store
    scenes: int = 3  # scenes shown as predicted vs ground-truth maps


@dataclass
class RealEvalConfig:
    """``hsissl evaluate-real``: the chain on the real scenes with spatially disjoint block splits."""

    name: str = "real-eval"
    source: str = "../shared/data"  # folder of the known .mat scenes
    # Samson's labels are the argmax of its unmixing abundances (3 classes, every pixel labelled)
    scenes: list[str] = field(
        default_factory=lambda: ["houston_dataset", "Indian_subset", "Samson"]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # protocol -> [block side in px, share of blocks used for training]
    protocols: dict[str, list[float]] = field(
        default_factory=lambda: {"half": [16, 0.5], "few-label": [8, 0.1]}
    )
    methods: list[str] = field(default_factory=lambda: ["mae", "dinov2", "ssvit"])
    # probe: logistic regression on per-pixel features; spec-probe: the same with the pixel's
    # normalised spectrum in front; linear | conv | segmenter: the finetune stage's heads
    heads: list[str] = field(default_factory=lambda: ["probe", "linear", "conv", "segmenter"])
    pretrain_steps: int = 300  # per method, on tiles of every shared scene
    tile_stride: int = 16  # overlapping 64-px pretraining tiles (the scenes are small)
    window_stride: int = 16  # sliding-window stride for per-pixel encoder features
    head_steps: int = 300  # trained heads' optimisation steps per split
    # DeepLabV3+ steps per split: 150 scored higher than 300 on every scene and protocol
    # measured (fewer steps overfit the few labels less; docs/real-data.md) at half the time
    baseline_steps: int = 150
    # peak of each head's poly schedule: high for few steps on few pixels; the Segmenter's
    # transformer collapses to one class at 3e-3 (measured on Indian Pines), so lower there
    head_lr: dict[str, float] = field(
        default_factory=lambda: {"linear": 3e-3, "conv": 3e-3, "segmenter": 1e-3}
    )
    head_batch: int = 8  # cached windows per head step
    baseline_encoder: str = "resnet18d"  # DeepLabV3+ encoder (timm); small: the scenes are tiny
    # DeepLabV3+ trains under bf16 autocast where the CPU has bf16 in hardware (AMX,
    # AVX512-BF16; fp32 elsewhere): most of evaluate-real's time is that training
    baseline_bf16: bool = True


@dataclass
class ConvertConfig:
    """``hsissl convert``: hyperspectral cubes of any sensor -> the WHU-OHS layout (docs/convert.md)."""

    src: str = ""  # ENVI .hdr, GeoTIFF, .mat/.npy with a sidecar, a sidecar .yaml, or a folder
    dst: str = ""  # output root: <dst>/<split>/{image,label,meta}/<name>.*
    split: str = "tr"
    sidecar: str = ""  # sidecar YAML for a single src ("" = <src stem>.yaml beside it, if any)
    label: str = ""  # label raster / .npy on the image grid, for a single src
    resampling: str = ""  # "" = the sidecar's, else auto: Gaussian SRFs when FWHM is known
    max_extrapolated: int | None = None  # OHS bands allowed from the edge band (None: sidecar, 2)


@dataclass
class Config:
    """Every section; a pretraining method registered in hsissl.methods beyond the built-in
    three adds its own (:func:`add_section`), so a loaded config may be a subclass with it."""

    run_dir: str = "runs/local"
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
    ssvit: SSViTConfig = field(default_factory=SSViTConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    real: RealEvalConfig = field(default_factory=RealEvalConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)


# Sections added by registered methods: name -> (section dataclass, rules of its keys).
_ADDED: dict[str, tuple[type, dict[str, config_rules.Check]]] = {}
_SCHEMAS: dict[tuple[tuple[str, type], ...], type] = {}  # one Config subclass per set of sections


def add_section(name: str, section: type, rules: dict[str, config_rules.Check] | None = None
                ) -> None:  # fmt: skip
    """Let configs have a top-level section ``name`` of dataclass ``section`` (a pretraining
    method's settings, YAML ``name:``), its keys checked by ``rules`` (key within the section ->
    check). The built-in methods' sections are fields of :class:`Config` already: a no-op."""
    known = typing.get_type_hints(Config).get(name)
    if known is not None:
        if known is not section:
            raise ValueError(f"config section {name!r} is {known.__name__}, not {section.__name__}")
        return
    if not dataclasses.is_dataclass(section):
        raise TypeError(f"config section {name!r}: {section!r} is not a dataclass")
    _ADDED[name] = (section, {f"{name}.{k}": c for k, c in (rules or {}).items()})


def remove_section(name: str) -> None:
    """Undo :func:`add_section` (a method unregistered); built-in sections stay."""
    _ADDED.pop(name, None)


def config_class() -> type[Config]:
    """:class:`Config`, or the subclass with the sections :func:`add_section` added."""
    key = tuple((name, section) for name, (section, _) in _ADDED.items())
    if not key:
        return Config
    if key not in _SCHEMAS:
        fields = [(name, section, field(default_factory=section)) for name, section in key]
        _SCHEMAS[key] = dataclasses.make_dataclass("Config", fields, bases=(Config,),
                                                   namespace={"__module__": __name__})  # fmt: skip
    return _SCHEMAS[key]


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML preset at ``path``, then ``key.sub=value`` overrides.

    The result is type-checked and :func:`validate`-d; every :class:`ConfigError` names the
    key and where its value came from (the file or "command line").
    """
    schema = config_class()
    tree = dataclasses.asdict(schema())
    origins: dict[str, str] = {}  # dotted key -> where its value was set (defaults: absent)
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"config file {path} is a directory, not a YAML file (e.g. configs/tiny.yaml)"
            )
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
        loaded = _parse_yaml(text, path=str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping at top level, found {type(loaded).__name__}"
            )
        _merge(tree, loaded, schema, prefix="", origin=str(path), origins=origins)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        value = _parse_yaml(raw, override=item) if raw.strip() else ""
        _set_dotted(tree, key.strip(), value, schema, origin="command line", origins=origins)
    cfg = _build(schema, tree, prefix="", origins=origins)
    validate(cfg, origins)
    return cfg


def config_from_tree(loaded: dict[str, Any], origin: str) -> Config:
    """Defaults, then the mapping ``loaded`` (e.g. a checkpoint's saved ``asdict(Config)``),
    type-checked and validated as a preset is; ``origin`` names it in errors. No file."""
    schema = config_class()
    tree = dataclasses.asdict(schema())
    origins: dict[str, str] = {}
    _merge(tree, loaded, schema, prefix="", origin=origin, origins=origins)
    cfg = _build(schema, tree, prefix="", origins=origins)
    validate(cfg, origins)
    return cfg


def _parse_yaml(text: str, path: str | None = None, override: str = "") -> Any:
    """``yaml.safe_load`` whose errors name the file (``path:line:column``) or the override."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context", None)
        if "\\t" in problem:  # the scanner's repr of a tab
            problem += " (YAML indents with spaces, not tabs)"
        elif context:
            problem += f" ({context})"
        if path is None:  # an override: columns count within its value
            at = f" at column {mark.column + 1}" if mark is not None else ""
            where = f"command line override {override!r}: value {text!r} is not valid YAML{at}"
        else:
            at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            where = f"{path}{at}: not valid YAML"
        raise ConfigError(f"{where}: {problem}") from None


def validate(cfg: Config, origins: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first value outside its key's allowed set
    (``hsissl.config_rules.RULES``).

    ``origins`` (dotted key -> file path or "command line") prefixes the message with where
    the value came from; :func:`load_config` passes it.
    """
    added = {k: c for _, rules in _ADDED.values() for k, c in rules.items()}
    for key, value, allowed in config_rules.violations(cfg, added):  # the first is reported
        where = _where(key, origins or {})
        raise config_rules.refuse(key, value, allowed, where.removesuffix(": "))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config (what the run really used) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """``{"data.tile_size": 64, …}``: the form MLflow params take."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def _merge(
    tree: dict, loaded: dict, cls: type, prefix: str, origin: str, origins: dict[str, str]
) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in loaded.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(
                f"{origin}: unknown config key {name!r}; valid keys here: {sorted(hints)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{origin}: config key {name!r} is a section; expected a mapping, found {value!r}"
                )
            _merge(tree[key], value, hints[key], prefix=f"{name}.", origin=origin, origins=origins)
        else:
            # plain values and dict fields (e.g. synthetic.scenes) are replaced whole
            tree[key] = value
            _record(origins, name, origin)


def _record(origins: dict[str, str], name: str, origin: str) -> None:
    """Remember where ``name`` was set; a value replaced whole forgets its sub-keys' origins."""
    for key in [k for k in origins if k.startswith(f"{name}.")]:
        del origins[key]
    origins[name] = origin


def _where(name: str, origins: dict[str, str]) -> str:
    """``"<origin>: "`` for the closest set key above ``name`` (``data.splits[1]`` -> ``data.splits``)."""
    parts = re.sub(r"\[\d+\]", "", name).split(".")
    for i in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:i]))
        if origin is not None:
            return f"{origin}: "
    return ""


def _set_dotted(tree: dict, dotted: str, value: Any, schema: type, origin: str,
                origins: dict[str, str]) -> None:  # fmt: skip
    parts = dotted.split(".")
    node, cls = tree, schema
    for i, part in enumerate(parts):
        name = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if cls is not None:
            hints = typing.get_type_hints(cls)
            if part not in hints:
                raise ConfigError(
                    f"{origin}: unknown config key {name!r}; valid keys here: {sorted(hints)}"
                )
            tp = hints[part]
        elif isinstance(node, dict) and last:
            tp = None  # a new entry in a dict field, e.g. synthetic.scenes.tr=4
        else:
            raise ConfigError(f"{origin}: unknown config key {name!r}")
        if last:
            node[part] = value
            _record(origins, dotted, origin)
        else:
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"{origin}: config key {'.'.join(parts[: i + 1])!r} has no sub-keys"
                )
            node = node[part]
            cls = tp if dataclasses.is_dataclass(tp) else None


def _build(cls: type, tree: dict, prefix: str, origins: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        value = tree.get(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{_where(name, origins)}config key {name!r} is a section; "
                    f"expected a mapping, found {value!r}"
                )
            kwargs[f.name] = _build(hints[f.name], value, prefix=f"{name}.", origins=origins)
        else:
            kwargs[f.name] = _coerce(value, hints[f.name], name, origins)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str, origins: dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = _where(name, origins)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, name, origins)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}config key {name!r}: expected a list, found {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]", origins) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}config key {name!r}: expected a mapping, found {value!r}")
        return {str(k): _coerce(v, args[1], f"{name}.{k}", origins) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise ConfigError(
        f"{where}config key {name!r}: expected {getattr(tp, '__name__', tp)}, found {value!r}"
    )
