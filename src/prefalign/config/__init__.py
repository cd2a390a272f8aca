"""Typed configs of every command, torch-free so that `prefalign <command> --help` stays instant.

`common` holds the groups the training commands share (model, data, training loop); `preference` (DPO, KTO, RM), `causal_lm`,
`rollout` and `tools` each command's own; `fields` turns attribute docstrings into help text; `checks` validates
what can be validated before anything is loaded.
"""

from prefalign.config.causal_lm import PretrainConfig, SFTConfig
from prefalign.config.common import (
    DataArgs,
    DatasetArgs,
    DatasetSource,
    LengthArgs,
    LoadArgs,
    LoraArgs,
    ModelArgs,
    ModelSource,
    PairArgs,
    PairData,
    PolicyArgs,
    PromptArgs,
    QuantArgs,
    ReferenceArgs,
    RowFilter,
    TrainArgs,
)
from prefalign.config.distill import DistillConfig, GKDArgs
from prefalign.config.fields import field_help
from prefalign.config.preference import (
    DPOArgs,
    DPOConfig,
    KTOArgs,
    KTOConfig,
    PreferenceLossArgs,
    RefSyncArgs,
    RMConfig,
    UnpairedArgs,
)
from prefalign.config.rollout import GRPOConfig, OnlineDPOArgs, OnlineDPOConfig, PPOConfig, RLOOConfig
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

__all__ = ["ChatConfig", "DPOArgs", "DPOConfig", "DataArgs", "DatasetArgs", "DatasetSource", "DemoConfig", "DistillConfig", "EvalConfig",
           "GKDArgs", "GRPOConfig", "InitModelConfig", "InspectConfig", "KTOArgs", "KTOConfig", "LengthArgs", "LoadArgs",
           "LoraArgs", "ModelArgs", "ModelSource", "OnlineDPOArgs", "OnlineDPOConfig", "PPOConfig", "PairArgs", "PairData", "PipelineConfig",
           "PlotConfig", "PolicyArgs", "PreferenceLossArgs", "PretrainConfig", "PromptArgs", "QuantArgs", "RLOOConfig", "RMConfig", "RefSyncArgs",
           "ReferenceArgs", "RowFilter", "SFTConfig", "TrainArgs", "TrainTokenizerConfig", "UnpairedArgs",
           "field_help"]
