"""onnxprune.pytorch: prune while training, with NNI's pruner names and arguments, dependency-aware
through onnxprune's channel graph; `speedup()` then exports, simplifies and proves the smaller
ONNX model equal to the PyTorch model.

    from onnxprune.pytorch import L1FilterPruner, speedup
    pruner = L1FilterPruner(model, [{"sparsity": 0.5, "op_types": ["Conv2d"]}], dummy_input=x)
    model = pruner.compress()                 # torch.nn.utils.prune masks; keep training
    small, report = speedup(model, x, "small.onnx")
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # the core never needs PyTorch; this part does
    from ..errors import TORCH_INSTALL

    raise ImportError(f"onnxprune.pytorch needs PyTorch: {TORCH_INSTALL}") from e

from .block import BlockPruner
from .export import export_onnx
from .groups import Channel, DependencyGroups, Group, ParamSlice, Plan, dependency_groups
from .masks import apply_masks, current_masks, make_permanent, normalize_masks
from .pruner import FilterPruner, FPGMPruner, HeadPruner, L1FilterPruner, L2FilterPruner, LevelPruner, Pruner, masked_state_dict
from .rounds import RoundResult, prune_in_rounds
from .schedules import AGPPruner, LotteryTicketPruner, agp_sparsity, lottery_sparsity
from .speedup import SpeedupReport, speedup
from .amc import AMCPruner
from .annealing import AutoCompressPruner, SimulatedAnnealingPruner
from .netadapt import NetAdaptPruner
from .resources import LatencyCache, Resources, measure_latency
from .search import ExperimentLog, SearchPruner, SearchSpace
from .sensitivity import SensitivityAnalysis, SensitivityPruner, sensitivity_analysis
from .training import ADMMPruner, ActivationAPoZRankFilterPruner, ActivationMeanRankFilterPruner, SlimPruner, TaylorFOWeightFilterPruner

__all__ = [
    "dependency_groups", "DependencyGroups", "Group", "Channel", "ParamSlice", "Plan",
    "Pruner", "FilterPruner", "HeadPruner", "BlockPruner", "LevelPruner", "L1FilterPruner", "L2FilterPruner", "FPGMPruner",
    "ActivationAPoZRankFilterPruner", "ActivationMeanRankFilterPruner", "TaylorFOWeightFilterPruner", "SlimPruner", "ADMMPruner",
    "AGPPruner", "LotteryTicketPruner", "agp_sparsity", "lottery_sparsity",
    "SensitivityPruner", "SensitivityAnalysis", "sensitivity_analysis", "NetAdaptPruner", "SimulatedAnnealingPruner",
    "AutoCompressPruner", "AMCPruner", "SearchPruner", "SearchSpace", "ExperimentLog", "Resources", "LatencyCache", "measure_latency", "speedup", "SpeedupReport", "export_onnx", "prune_in_rounds", "RoundResult",
    "apply_masks", "current_masks", "make_permanent", "normalize_masks", "masked_state_dict",
]
