"""Bundled pruning methods; importing this package registers them."""

from tuner.pruning.methods.avgpool import AvgPool
from tuner.pruning.methods.cdpruner import CDPruner
from tuner.pruning.methods.dart import DART
from tuner.pruning.methods.divprune import DivPrune
from tuner.pruning.methods.fastv import FastV
from tuner.pruning.methods.keep_all import KeepAll
from tuner.pruning.methods.pooling import Pooling
from tuner.pruning.methods.random import RandomPruning
from tuner.pruning.methods.sparsevlm import SparseVLM
from tuner.pruning.methods.visionzip import VisionZip
from tuner.pruning.methods.window_fastv import WindowFastV

__all__ = ["DART", "AvgPool", "CDPruner", "DivPrune", "FastV", "KeepAll", "Pooling", "RandomPruning", "SparseVLM",
           "VisionZip", "WindowFastV"]
