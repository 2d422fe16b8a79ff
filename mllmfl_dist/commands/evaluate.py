"""``python -m mllmfl_dist evaluate CONFIG --checkpoint PATH``: a saved model's accuracy on the config's test
set (and validation split), printed as JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mllmfl_dist.core import checkpoint
from mllmfl_dist.core.errors import ConfigError
from mllmfl_dist.fl.evaluate import evaluate_on_splits, imbalance_warning
from mllmfl_dist.fl.strategies import build_strategy
from mllmfl_dist.stages.inputs import build_data, build_fl_model


def run(cfg, checkpoint_path: str) -> int:
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file")
    state = checkpoint.load_or_explain(path, "--checkpoint")
    if not isinstance(state, dict):
        raise ConfigError(f"--checkpoint {path} holds no state dict")
    server_state = None
    if "model" in state and isinstance(state["model"], dict):
        saved_strategy = (state.get("config") or {}).get("federated", {}).get("strategy")
        if saved_strategy not in (None, cfg.federated.strategy):
            raise ConfigError(
                f"--checkpoint {path} was trained with federated.strategy = {saved_strategy!r}; "
                f"evaluate it with that strategy (--set federated.strategy={saved_strategy})"
            )
        # "server_optimizer": what checkpoints called the strategy's state before it was called "strategy"
        server_state = state.get("strategy", state.get("server_optimizer"))
        state = state["model"]
    data = build_data(cfg)
    strategy = build_strategy(cfg)
    model = build_fl_model(cfg.model, data, cfg.run.seed, strategy.projection_dim)
    try:
        model.load_state_dict(state)
        if server_state is not None:
            # A training checkpoint: evaluate what the run evaluated (CReFF: the re-trained classifier).
            strategy.load_state_dict(server_state)
            model = strategy.evaluation_model(model)
    except (RuntimeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"--checkpoint {path} does not fit the config's model ({cfg.model.arch}) and "
            f"federated.strategy ({cfg.federated.strategy}): {str(err).splitlines()[0]}"
        ) from None
    imbalance = imbalance_warning(data.test_set()[1], data.class_names)
    if imbalance:
        logging.getLogger("mllmfl_dist").warning("%s", imbalance)
    report = evaluate_on_splits(data, model, cfg.eval.batch_size, "cpu")
    print(json.dumps(report, indent=2))
    return 0
