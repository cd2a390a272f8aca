"""Typed configs of every command, torch-free so that `prefalign <command> --help` stays instant.

`common` holds the groups the training commands share (model, data, training loop); `preference` (DPO, KTO, RM), `causal_lm`,
`rollout` and `tools` each command's own; `fields` turns attribute docstrings into help text; `checks` validates
what can be validated before anything is loaded.
"""

from prefalign.config.causal_lm import PretrainConfig, SFTConfig
from prefalign.config.common import (
    DataArgs,
    DatasetArgs,
    LengthArgs,
    ModelArgs,
    ModelSource,
    PairArgs,
    PromptArgs,
    TrainArgs,
)
from prefalign.config.fields import field_help
from prefalign.config.preference import (
    DPOArgs,
    DPOConfig,
    KTOArgs,
    KTOConfig,
    RefSyncArgs,
    RMConfig,
    UnpairedArgs,
)
from prefalign.config.rollout import GRPOConfig, PPOConfig, RLOOConfig
from prefalign.config.tools import (
    ChatConfig,
    DemoConfig,
    EvalConfig,
    InitModelConfig,
    InspectConfig,
    PipelineConfig,
    PlotConfig,
    TrainTokenizerConfig,
)

__all__ = ["ChatConfig", "DPOArgs", "DPOConfig", "DataArgs", "DatasetArgs", "DemoConfig", "EvalConfig", "GRPOConfig", "InitModelConfig",
           "InspectConfig", "KTOArgs", "KTOConfig", "LengthArgs", "ModelArgs", "ModelSource", "PairArgs", "PPOConfig", "PipelineConfig", "PlotConfig", "PretrainConfig", "PromptArgs", "RLOOConfig",
           "RMConfig", "RefSyncArgs", "UnpairedArgs", "SFTConfig", "TrainArgs", "TrainTokenizerConfig", "field_help"]
