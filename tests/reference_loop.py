"""The framework-free reference: FedAvg written plainly in one process, the loop a researcher would write.

A test helper (tests/test_distributed.py checks a 3-process round against it) that the benchmark
(``benchmarks/bench.py``) also times the trainer against; it lives with the tests so the package never
imports it and the tests import nothing from the benchmark.
"""

from __future__ import annotations

import time

import torch

from mllmfl_dist.config import Config
from mllmfl_dist.core.seeds import TAG_CLIENT_TRAINING, derive_seed
from mllmfl_dist.data import augment_batch, normalize
from mllmfl_dist.fl.sampling import sample_clients
from mllmfl_dist.stages.inputs import build_data, build_fl_model


def reference_rounds(cfg: Config, rounds: int, threads: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """FedAvg written plainly in one process: no process group, no flat buffers, no strategy hooks.

    Returns the final global state dict and the seconds of each round. It draws clients, data order
    and augmentation from the same seeds as the trainer, so with the same thread count the two must
    agree; the tests use it as the single-process reference for a distributed round, and the benchmark
    (benchmarks/bench.py) times the trainer against it.
    """
    torch.set_num_threads(threads)
    data = build_data(cfg)
    model = build_fl_model(cfg.model, data, cfg.run.seed)
    fed, aug = cfg.federated, cfg.data
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = []
    for round_index in range(1, rounds + 1):
        started = time.perf_counter()
        states, weights = [], []
        for cid in sample_clients(cfg.run.seed, round_index, fed.num_clients, fed.clients_per_round):
            model.load_state_dict(global_state)
            model.train()
            images, labels = data.client(cid)
            generator = torch.Generator().manual_seed(derive_seed(cfg.run.seed, TAG_CLIENT_TRAINING, round_index, cid))
            optimizer = torch.optim.SGD(
                model.parameters(), lr=fed.lr, momentum=fed.momentum, weight_decay=fed.weight_decay
            )
            n = len(labels)
            for _ in range(fed.local_epochs):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, fed.batch_size):
                    batch = order[start : start + fed.batch_size]
                    if len(batch) < 2:
                        continue
                    x = augment_batch(images[batch], generator, aug.crop_padding, aug.hflip, aug.random_crop)
                    loss = torch.nn.functional.cross_entropy(model(normalize(x, data.mean, data.std)), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            states.append({k: v.detach().to(torch.float64) for k, v in model.state_dict().items()})
            weights.append(float(n))
        total = sum(weights)
        for key, value in global_state.items():
            mean = sum(w * s[key] for w, s in zip(weights, states)) / total
            global_state[key] = mean.round().to(value.dtype) if not value.is_floating_point() else mean.to(value.dtype)
        seconds.append(time.perf_counter() - started)
    return global_state, seconds
