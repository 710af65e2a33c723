"""Netloader's loggers: one per module, and the prefix of every line about a rank.

``get_logger(__name__)`` gives module ``netloader.seed.server`` the logger
``vllm.netloader.seed.server``: a child of the ``vllm`` logger, which vLLM configures
in every process it runs (handler, format, ``VLLM_LOGGING_LEVEL``; vllm/logger.py), so
these lines look and filter like vLLM's own ``init_logger(__name__)`` ones. This module
imports neither vLLM nor torch: the config and the wire stay light to import.
"""

import logging

_PACKAGE = "vllm_ascend.model_loader.netloader"


def get_logger(name: str) -> logging.Logger:
    """The logger of the module named ``name`` (pass ``__name__``)."""
    below = name.removeprefix(_PACKAGE).lstrip(".")
    return logging.getLogger("vllm.netloader" + (f".{below}" if below else ""))


def who(rank: object, role: str | None = None, seed: bool = False) -> str:
    """How a line names the rank it is about: ``Netloader rank 0``, ``Netloader rank 0
    target`` (with ``role``), ``Netloader seed rank 0 draft`` (``seed``: a listener's
    line). Transfer lines go on with the peer's address and the sizes."""
    return " ".join(["Netloader", *(["seed"] if seed else []), f"rank {rank}",
                     *([role] if role else [])])
