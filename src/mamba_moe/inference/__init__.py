"""Generation from a trained (or freshly built) model: engine, sampling, chat CLI and HTTP server."""

from .engine import Engine
from .greedy import greedy_generate
from .request import Completion, StreamEvent
from .sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamEvent", "greedy_generate"]
