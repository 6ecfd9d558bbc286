"""Generation from a trained (or freshly built) model: engine, sampling, chat CLI and HTTP server.

``core/`` is the engine (requests, sampling, prompts, the running batch), ``decoders/`` the decode-step
variants, ``serving/`` the OpenAI-compatible server; ``cli.py`` only parses arguments and calls
``load_engine`` and ``serving.server.serve``.
"""

from .core.engine import Engine, load_engine
from .core.greedy import greedy_generate
from .core.request import Completion, StreamEvent
from .core.sampling import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "StreamEvent", "greedy_generate", "load_engine"]
