"""Stage 3: alignment on rank 0 after aggregation."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mllmfl_dist.config import AlignConfig, load_config
from mllmfl_dist.data.synthetic import make_prototypes, render
from mllmfl_dist.fl.evaluate import evaluate_model
from mllmfl_dist.stages.align import AlignmentSet, align_model, alignment_loss, take_per_class
from mllmfl_dist.stages.inputs import build_data, build_fl_model

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def test_alignment_loss_at_t1_is_the_papers_ce_plus_beta_kl():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    q = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    beta = 0.7
    p = [[math.exp(z) / sum(math.exp(v) for v in row) for z in row] for row in logits.tolist()]
    ce = -(math.log(p[0][0]) + math.log(p[1][2])) / 2
    kl = sum(qi * math.log(qi / pi) for q_row, p_row in zip(q.tolist(), p) for qi, pi in zip(q_row, p_row)) / 2
    assert float(alignment_loss(logits, labels, q, beta, 1.0)) == pytest.approx(ce + beta * kl, rel=1e-6)
    assert float(alignment_loss(logits, labels, None, beta, 1.0)) == pytest.approx(ce, rel=1e-6)


def test_alignment_loss_at_t2_tempers_both_sides_and_scales_by_t_squared():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    q = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    T, beta = 2.0, 0.7
    rows = logits.tolist()
    p = [[math.exp(z) / sum(math.exp(v) for v in row) for z in row] for row in rows]
    ce = -(math.log(p[0][0]) + math.log(p[1][2])) / 2  # the label term stays at T = 1
    p_t = [[math.exp(z / T) / sum(math.exp(v / T) for v in row) for z in row] for row in rows]
    q_t = [[qi ** (1 / T) / sum(v ** (1 / T) for v in row) for qi in row] for row in q.tolist()]
    kl = sum(a * math.log(a / b) for qa, pb in zip(q_t, p_t) for a, b in zip(qa, pb)) / 2
    assert float(alignment_loss(logits, labels, q, beta, T)) == pytest.approx(ce + beta * T**2 * kl, rel=1e-6)
    # The teacher is softened too: not the old beta * T^2 * KL(q || p_T).
    kl_untempered = sum(a * math.log(a / b) for qa, pb in zip(q.tolist(), p_t) for a, b in zip(qa, pb)) / 2
    assert float(alignment_loss(logits, labels, q, beta, T)) != pytest.approx(ce + beta * T**2 * kl_untempered)


def test_take_per_class_reports_short_classes():
    labels = np.array([0, 1, 0, 2, 0, 1])
    keep, short = take_per_class(labels, 3, 2)
    assert keep.tolist() == [0, 1, 2, 3, 5] and short == [2]
    keep, _ = take_per_class(labels, 3, 1, score=np.array([0.1, 0.2, 0.9, 0.5, 0.3, 0.8]))
    assert keep.tolist() == [2, 3, 5]  # the most confident of each class


def test_alignment_without_teacher_raises_tail_accuracy_of_a_head_biased_model():
    cfg = load_config(SMOKE, ["data.imb_factor=0.02", "dist.threads=1"])
    data = build_data(cfg)
    torch.manual_seed(0)
    model = build_fl_model(cfg.model, data, cfg.run.seed)
    # Head-biased: trained centrally on the long-tailed training set itself.
    images = torch.cat([data.client(c)[0] for c in range(data.num_clients)])
    labels = torch.cat([data.client(c)[1] for c in range(data.num_clients)])
    from mllmfl_dist.data import normalize

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = normalize(images, data.mean, data.std)
    for epoch in range(3):
        for batch in torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch)).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test_images, test_labels = data.test_set()

    def report():
        return evaluate_model(
            model,
            test_images,
            test_labels,
            num_classes=data.num_classes,
            train_class_counts=data.train_class_counts(),
            mean=data.mean,
            std=data.std,
        )

    before = report()
    # A balanced server-held pool: 20 fresh images per class drawn from the same class prototypes.
    prototypes = make_prototypes(data.num_classes, 3, 16, cfg.run.seed)
    pool_labels = np.repeat(np.arange(data.num_classes), 20)
    pool = AlignmentSet(
        render(prototypes, pool_labels, np.random.default_rng(123)), torch.from_numpy(pool_labels), None, []
    )
    stats = align_model(
        model,
        pool,
        AlignConfig(every=1, steps=60, lr=0.05, train="classifier"),
        data.mean,
        data.std,
        seed=0,
        round_index=1,
    )
    after = report()
    tail = [c for c, n in enumerate(data.train_class_counts()) if n <= 20]
    tail_before = np.mean([before["per_class"][c] for c in tail])
    tail_after = np.mean([after["per_class"][c] for c in tail])
    assert tail_after > tail_before + 0.2, (tail_before, tail_after)
    assert stats["align_loss"] > 0


def test_after_alignment_every_rank_holds_the_same_model(tmp_path):
    script = tmp_path / "dump_ranks.py"
    script.write_text(
        "import sys, torch\n"
        "from mllmfl_dist.core import dist\n"
        "from mllmfl_dist.config import load_config\n"
        "from mllmfl_dist.stages import federated\n"
        "cfg = load_config(sys.argv[1], sys.argv[3:])\n"
        "runtime = dist.init_runtime(cfg.dist)\n"
        "captured = {}\n"
        "original = federated.FederatedTrainer.broadcast_global\n"
        "def spy(self):\n"
        "    out = original(self)\n"
        "    captured['model'] = {k: v.clone() for k, v in self.model.state_dict().items()}\n"
        "    return out\n"
        "federated.FederatedTrainer.broadcast_global = spy\n"
        "federated.run_federated(cfg, runtime)\n"
        "torch.save(captured['model'], f'{sys.argv[2]}/rank{runtime.rank}.pt')\n"
        "dist.shutdown(runtime)\n"
    )
    sets = [
        f"run.root={tmp_path}",
        "federated.rounds=2",
        "align.every=1",
        "align.steps=10",
        "align.lr=0.5",
        "align.pool_shards=shards/fmnist_align/*.tar.gz",
        "log.progress=false",
        "log.tensorboard=false",
        "dist.threads=1",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        str(script),
        str(SMOKE),
        str(tmp_path),
        *sets,
    ]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    models = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    for other in models[1:]:
        assert all(torch.equal(models[0][k], other[k]) for k in models[0])
    metrics = tmp_path / "smoke" / "federated" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all("before_align" in r and "align_loss" in r for r in records)
    assert any(r["before_align"]["acc"] != r["acc"] for r in records)  # alignment changed the model


def test_server_holdout_is_disjoint_from_every_client_and_feeds_alignment(tmp_path):
    from mllmfl_dist.stages.align import build_alignment_set

    cfg = load_config(
        SMOKE, ["data.server_holdout_per_class=5", "align.every=1", "align.source=holdout", "align.per_class=5"]
    )
    data = build_data(cfg)
    client_indices = np.concatenate([data.client_indices(c) for c in range(data.num_clients)])
    pool_images, pool_labels = data.server_pool()
    assert np.bincount(pool_labels.numpy()).tolist() == [5] * data.num_classes
    assert not np.intersect1d(data._server_pool, client_indices).size
    aligned = build_alignment_set(cfg, data, cache_dir=tmp_path)
    assert aligned.labels.tolist() == pool_labels.tolist()
    assert torch.equal(aligned.images, pool_images)


def test_web_images_pseudo_labeled_by_the_teacher(tmp_path, tiny_models):
    from mllmfl_dist.stages.align import build_alignment_set

    cfg = load_config(
        SMOKE,
        [
            "align.every=1",
            "align.source=web",
            "align.teacher=clip",
            "align.per_class=3",
            f"align.teacher_model=local-dir:{tiny_models['clip']}",
            "align.teacher_temperature=0.05",
            "align.web_shards=shards/pool/pool-000000.tar.gz",
        ],
    )
    data = build_data(cfg)
    aligned = build_alignment_set(cfg, data, cache_dir=tmp_path)
    assert aligned.teacher is not None and aligned.teacher.shape == (len(aligned.labels), data.num_classes)
    torch.testing.assert_close(aligned.teacher.sum(dim=1), torch.ones(len(aligned.labels)))
    assert torch.equal(aligned.teacher.argmax(dim=1), aligned.labels)  # pseudo-labels are the teacher's
    counts = torch.bincount(aligned.labels, minlength=data.num_classes)
    assert counts.max() <= 3
    assert aligned.short_classes == [c for c in range(data.num_classes) if counts[c] < 3]
    assert aligned.images.shape[1:] == (data.in_channels, data.image_size, data.image_size)
