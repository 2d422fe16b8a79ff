"""Two nodes without a cluster: two torchrun agents on this host meet in a c10d rendezvous, so LOCAL_RANK
restarts at 0 on the second "node" while both share one file system, as nodes of a cluster usually do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from launchers import REPO, SMOKE, clean_env, final_model, free_port, max_abs_difference, sets
from test_imagenet_lt import SIZE, TEST_PER_CLASS, TRAIN_COUNTS, fake_imagenet  # noqa: F401 (fixture)

ROUNDS4 = "federated.rounds=4"


def test_two_torchrun_agents_of_two_ranks_equal_one_node_of_four(smoke_reference, tmp_path):
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=2",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=two-nodes",
                "-m",
                "mllmfl_dist",
                "federate",
                str(SMOKE),
                *sets(f"run.root={tmp_path}", ROUNDS4),
            ],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    summary = json.loads((tmp_path / "smoke" / "federated" / "summary.json").read_text())
    assert summary["world_size"] == 4
    assert max_abs_difference(final_model(tmp_path), smoke_reference(4, ROUNDS4)) <= 1e-6


# One rank of a two-node job: it loads ImageNet-LT (building the shared uint8 cache if nobody has) once the
# start file appears, counting every image it decodes, and prints a digest of what it got.
RANK = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    from mllmfl_dist.data import imagenet_lt

    root, start, counts = sys.argv[1:4]
    decode = imagenet_lt._decode

    def counted(path, size, *bounds):
        with open(Path(counts) / f"node{os.environ['GROUP_RANK']}-local{os.environ['LOCAL_RANK']}", "a") as f:
            f.write(f"{path}\\n")
        time.sleep(0.02)  # a longer build, so that a second builder would overlap it
        return decode(path, size, *bounds)

    imagenet_lt._decode = counted  # counts the real decodes; nothing else is replaced
    (Path(counts) / f"ready{os.environ['RANK']}").touch()
    while not Path(start).exists():
        time.sleep(0.01)
    data = imagenet_lt.load_imagenet_lt(root, "", int(sys.argv[4]))
    digest = hashlib.sha256(data.train_images.numpy().tobytes() + data.test_images.numpy().tobytes()).hexdigest()
    print(json.dumps({"digest": digest, "n": len(data.train_labels)}))
""")


def test_imagenet_lt_cache_is_built_once_by_two_nodes_sharing_it(fake_imagenet, tmp_path):  # noqa: F811
    """Four ranks on two "nodes" (LOCAL_RANK 0, 1 on each: two local rank 0s on one file system) build the
    ImageNet-LT cache at once: the lock, not the local rank, picks one builder; all read the same images."""
    start, counts = tmp_path / "start", tmp_path / "counts"
    counts.mkdir()
    ranks = []
    for rank in range(4):
        node, local = divmod(rank, 2)
        env = clean_env(
            RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(local), GROUP_RANK=str(node), LOCAL_WORLD_SIZE="2"
        )
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK, str(fake_imagenet), str(start), str(counts), str(SIZE)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 120
    while len(list(counts.glob("ready*"))) < 4 and time.monotonic() < deadline:  # all at the start line
        time.sleep(0.05)
    start.touch()
    try:
        results = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0, 0, 0], [err[-1500:] for _, err in results]
    outputs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert len({o["digest"] for o in outputs}) == 1 and outputs[0]["n"] == sum(TRAIN_COUNTS)
    decoded = [line for f in counts.glob("node*") for line in f.read_text().splitlines()]
    total = sum(TRAIN_COUNTS) + TEST_PER_CLASS * len(TRAIN_COUNTS)
    assert len(decoded) == total and len(set(decoded)) == total, sorted(f.name for f in counts.glob("node*"))
    # No temporary file of a builder is left beside the entries.
    assert not [p.name for p in (fake_imagenet / ".mllmfl_cache").iterdir() if ".tmp" in p.name]
