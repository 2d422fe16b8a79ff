"""The errors the CLI turns into one line and an exit code.

They live here, in a module that imports nothing, so that ``python -m mllmfl_dist --help`` and the CLI's
error handling do not pull in torch: the modules that raise them (config, data, models, dist, the round
loop) re-export them under their old names.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key and what is allowed. Exit code 2."""


class DataError(RuntimeError):
    """A user-caused data problem (missing files, too few samples); the message is one line naming the
    path and the config key or flag to change. The CLI prints it and exits with code 2."""


class ModelLoadError(RuntimeError):
    """A model (LLaVA or CLIP) could not be loaded. The message is one line: the model string, why, and what
    to do (network / cache, or a local directory). Exit code 2."""


class TrainingDivergedError(RuntimeError):
    """A round made the model non-finite; raised on every rank with the same one-line message, before
    anything of that round is saved. Exit code 3."""


class RankLostError(RuntimeError):
    """A wait on other ranks ran out or broke; the message names the wait, the missing ranks and the key
    that sets its timeout. Exit code 4."""
