"""Model registry: one ModelSpec per family, looked up by ``model.name``.

The trainer, the planner and the tests all build models through ``get_model_spec`` so
they never disagree about a flavor's sizes.
"""

import copy
from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn

from .args import MoETransformerArgs
from .deepseek_moe import DeepSeekMoEModel, deepseek_moe_flavors
from .init import InitRule, transformer_init_rule
from .qwen3_moe import Qwen3MoEModel, qwen3_moe_flavors


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: Mapping[str, MoETransformerArgs]
    model_cls: Callable[[MoETransformerArgs], nn.Module]
    init_rule: Callable[[str, int], InitRule] = transformer_init_rule

    def get_flavor(self, flavor: str) -> MoETransformerArgs:
        """A private copy of the flavor's arguments (callers may edit it)."""
        if flavor not in self.flavors:
            raise ValueError(
                f"model.flavor = {flavor!r} is not a flavor of {self.name}; allowed: {list(self.flavors)}")
        return copy.deepcopy(self.flavors[flavor])


_REGISTRY: dict[str, ModelSpec] = {}


def register_model_spec(spec: ModelSpec) -> None:
    _REGISTRY[spec.name] = spec


def get_model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise ValueError(f"model.name = {name!r} is not a known model; allowed: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


register_model_spec(ModelSpec("qwen3_moe", qwen3_moe_flavors, Qwen3MoEModel))
register_model_spec(ModelSpec("deepseek_moe", deepseek_moe_flavors, DeepSeekMoEModel))
