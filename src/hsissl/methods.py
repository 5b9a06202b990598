"""The pretraining methods: one registered :class:`Method` each, which everything else iterates.

A method is its name, its config section (an ``OptimConfig`` dataclass; YAML ``<name>:``), its
recipe (a ``hsissl.pretrain.recipe.Recipe``: modules, loss and step, and through ``encoder()`` /
``build()`` what its checkpoint holds), its default model factory and how reports and help texts
name it. From the registry come the CLI's ``hsissl pretrain-<name>``, the stage
(``hsissl.stages.pretrain``), the KFP component ``pretrain-<name>`` (``components.pretrain``),
the DAG's ``run_<name>`` parameter and tasks, the multi-node job builders, evaluate-real's
methods and the report's labels and order. Adding a method is one :func:`register`:

    @methods.register(section=MyConfig, default_model="vit_tiny_patch8_64", label="Mine",
                      summary="pretrain mine")
    class MyRecipe(Recipe):
        method = "mine"

Light on purpose (no torch): the CLI, components and the DAG list methods in pods without a
GPU stack; a recipe named as ``"module:Class"`` is imported when first trained.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hsissl import config, config_rules
from hsissl.config import ConfigError, DINOv2Config, MAEConfig, OptimConfig, SSViTConfig

NAME = re.compile(r"[a-z][a-z0-9]*")  # a CLI stage, YAML section, KFP task and Python name part
STAGE_PREFIX = "pretrain-"


@dataclass(frozen=True)
class Method:
    name: str  # "mae": section mae:, stage pretrain-mae, checkpoints/<name> by default
    section: type[OptimConfig]  # its config section's dataclass
    recipe: type | str  # the Recipe class, or "module:Class" imported when first needed
    default_model: str  # model factory (hsissl.models) when <name>.model is ""
    label: str  # short name in reports and tables, e.g. "SS-ViT"
    summary: str  # one line: the CLI's help for pretrain-<name>
    noun: str = ""  # "an MAE": the DAG's run_<name> says "Pretrain <noun>." ("" = the label)
    rules: Mapping[str, config_rules.Check] = field(default_factory=dict)  # its own keys' checks

    @property
    def stage(self) -> str:
        return f"{STAGE_PREFIX}{self.name}"

    def recipe_class(self) -> type:
        if isinstance(self.recipe, str):
            module, _, attr = self.recipe.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.recipe


_REGISTRY: dict[str, Method] = {}


def add(method: Method) -> Method:
    """Register ``method`` (again: a no-op); its section joins the config schema."""
    if not NAME.fullmatch(method.name):
        raise ValueError(f"method name {method.name!r}: expected {NAME.pattern}")
    if not issubclass(method.section, OptimConfig):
        raise TypeError(f"method {method.name}: section {method.section.__name__} must extend "
                        "OptimConfig (the trainer reads lr, betas, … from it)")  # fmt: skip
    known = _REGISTRY.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"method {method.name!r} is registered already")
    config.add_section(method.name, method.section, {**config_rules.OPTIM_RULES, **method.rules})
    _REGISTRY[method.name] = method
    return method


def register(name: str = "", **fields: Any) -> Callable[[type], type]:
    """Class decorator: register the Recipe it decorates as method ``name`` (default: the
    class's ``method`` attribute); ``fields`` are the other :class:`Method` fields."""

    def decorate(recipe: type) -> type:
        add(Method(name=name or recipe.method, recipe=recipe, **fields))
        return recipe

    return decorate


def unregister(name: str) -> None:
    """Forget method ``name`` and its config section (tests register methods of their own)."""
    if _REGISTRY.pop(name, None) is not None:
        config.remove_section(name)


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown pretraining method {name!r}; registered: {names()}") from None


def names() -> list[str]:
    """Registered method names, in registration order (the built-in three first)."""
    return list(_REGISTRY)


def registered() -> list[Method]:
    return list(_REGISTRY.values())


def of_stage(stage: str) -> Method | None:
    """The method that ``stage`` (e.g. "pretrain-mae") pretrains; None for other stages."""
    name = stage.removeprefix(STAGE_PREFIX)
    return _REGISTRY.get(name) if stage.startswith(STAGE_PREFIX) else None


add(Method(
    name="mae", section=MAEConfig, recipe="hsissl.pretrain.mae:MAERecipe",
    default_model="mae_vit_base_patch8_64", label="MAE", noun="an MAE",
    summary="pretrain a masked autoencoder (ViT-B/8, 75 percent of patches masked)",
))  # fmt: skip
add(Method(
    name="dinov2", section=DINOv2Config, recipe="hsissl.pretrain.dinov2:DINOv2Recipe",
    default_model="dinov2_vit_base_patch8_64", label="DINOv2",
    summary="pretrain DINOv2 (ViT-B/8 + 4 registers + SwiGLU; DINO + iBOT + KoLeo)",
))  # fmt: skip
add(Method(
    name="ssvit", section=SSViTConfig, recipe="hsissl.pretrain.ssvit:SSViTRecipe",
    default_model="ssvit_base_patch8_64", label="SS-ViT", noun="the spatial-spectral ViT",
    summary="pretrain the spatial-spectral ViT with the DINOv2 recipe on both streams",
))  # fmt: skip
