"""The tiny zoo: a small, real model pool built locally (no hub needed)."""

from evomerge.zoo.build import Zoo, build_zoo
from evomerge.zoo.config import ZooConfig, micro_config

__all__ = ["Zoo", "ZooConfig", "build_zoo", "micro_config"]
