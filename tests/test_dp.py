"""Central DP (DP-FedAvg, mllmfl_dist/fl/dp.py): clipping, noise, the accountant's event, refusals, and the
promise that 1 and 3 processes end with the same model with DP on."""

import json
import math
import subprocess
import sys

import dp_accounting
import pytest
import torch

from mllmfl_dist.config import ConfigError, load_config
from mllmfl_dist.config.resume import resume_differences
from mllmfl_dist.fl import dp
from mllmfl_dist.fl.aggregation import FlatLayout
from mllmfl_dist.fl.sampling import sample_clients
from test_distributed import REPO, SMOKE, federate, final_model, max_abs_difference


def test_each_clipped_update_has_norm_at_most_the_clip_norm_and_small_ones_pass_unchanged():
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(1000, dtype=torch.float64, generator=gen)
    for scale in (0.01, 0.3, 5.0, 300.0):
        state = start + scale * torch.randn(1000, dtype=torch.float64, generator=gen)
        clipped, norm = dp.clip_update(start, state, 1.0)
        assert float(torch.linalg.vector_norm(clipped - start)) <= 1.0 + 1e-9
        if norm <= 1.0:
            assert torch.equal(clipped, state)
        else:  # the direction is kept
            direction = torch.nn.functional.cosine_similarity(clipped - start, state - start, dim=0)
            assert float(direction) > 1 - 1e-12


def test_integer_buffers_get_no_update_and_buffers_count_in_the_clipped_norm():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    layout = FlatLayout.of_module(model)
    central = dp.CentralDP(layout, clip_norm=0.5, noise_multiplier=0.0, seed=0)
    start = layout.flatten(model.state_dict())
    state = start.clone() + 3.0  # every entry moves, num_batches_tracked included
    clipped = central.clip(start, state)
    views = layout.views(clipped - start)
    assert float(views["1.num_batches_tracked"].abs().max()) == 0.0
    assert float(views["1.running_var"].abs().min()) > 0  # BatchNorm statistics are part of the clipped vector
    assert float(torch.linalg.vector_norm(clipped - start)) == pytest.approx(0.5, rel=1e-12)


def test_noise_standard_deviation_is_noise_multiplier_times_clip_norm():
    # n = 200,000 draws: the sample std's relative standard error is 1 / sqrt(2n) = 0.0016; 1% is 6 of them.
    z, clip_norm, n = 1.3, 0.7, 200_000
    noise = dp.gaussian_noise(n, z * clip_norm, seed=5, round_index=3)
    assert float(noise.std()) == pytest.approx(z * clip_norm, rel=0.01)
    assert abs(float(noise.mean())) < 5 * z * clip_norm / math.sqrt(n)
    assert torch.equal(noise, dp.gaussian_noise(n, z * clip_norm, seed=5, round_index=3))
    assert not torch.equal(noise, dp.gaussian_noise(n, z * clip_norm, seed=5, round_index=4))


def test_noisy_mean_is_the_sum_plus_noise_over_the_client_count():
    layout = FlatLayout.of_shapes({"w": (4,)})
    central = dp.CentralDP(layout, clip_norm=2.0, noise_multiplier=0.5, seed=1)
    acc = torch.tensor([3.0, 6.0, 9.0, 12.0, 3.0], dtype=torch.float64)  # 3 clients, weight 1 each
    expected = (acc[:-1] + dp.gaussian_noise(4, 1.0, 1, 7)) / 3
    assert torch.allclose(central.noisy_mean(acc, 7), expected, rtol=0, atol=1e-12)


def test_the_dp_event_matches_the_trainers_sampling():
    # The trainer: K distinct clients of N each round, fixed size (sampling.py)
    picked = sample_clients(0, 1, 50, 10)
    assert len(picked) == len(set(picked)) == 10
    event = dp.dp_event(50, 10, 2.0, "rdp", rounds=7)
    assert isinstance(event, dp_accounting.SelfComposedDpEvent) and event.count == 7
    one = event.event
    assert isinstance(one, dp_accounting.SampledWithoutReplacementDpEvent)
    assert (one.source_dataset_size, one.sample_size) == (50, 10)
    assert one.event == dp_accounting.GaussianDpEvent(1.0)  # z / 2: replace-one moves the sum by 2 C
    pld_event = dp.dp_event(50, 10, 2.0, "pld")
    assert pld_event == dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0))


def test_rdp_and_pld_agree_on_the_same_event_and_rank_as_expected_on_the_trainers():
    # q = 0.1, z = 4, 50 rounds, delta 1e-5. On the one event both accept (Poisson), RDP is an upper bound
    # known to be 10-20% above PLD's near-tight value: the tolerance is 25%. On the trainer's sampling, RDP's
    # without-replacement bound (Wang et al.) is looser still, and never below PLD's dominating pair.
    z, rounds, delta = 4.0, 50, 1e-5
    poisson = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(z / 2)), rounds
    )
    rdp_acc = dp_accounting.rdp.RdpAccountant()
    rdp_acc.compose(poisson)
    pld_acc = dp.new_accountant("pld")
    pld_acc.compose(poisson)
    rdp_eps, pld_eps = rdp_acc.get_epsilon(delta), pld_acc.get_epsilon(delta)
    assert pld_eps <= rdp_eps <= 1.25 * pld_eps
    trainer_rdp = dp.epsilon(1000, 100, z, rounds, delta, "rdp")
    trainer_pld = dp.epsilon(1000, 100, z, rounds, delta, "pld")
    assert trainer_pld == pytest.approx(pld_eps, rel=1e-9)
    assert trainer_pld <= trainer_rdp <= 3 * trainer_pld


def test_ledger_epsilon_grows_with_rounds_and_equals_a_fresh_computation():
    cfg = load_config(
        SMOKE, ["dp.enabled=true", "dp.noise_multiplier=3.0", "dp.accountant=rdp"], check_run_dir=False
    ).dp
    ledger = dp.PrivacyLedger(cfg, 20, 8, 5)
    eps = [ledger.epsilon(r) for r in (1, 2, 5)]
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == pytest.approx(dp.epsilon(20, 8, 3.0, 5, cfg.delta, "rdp"), rel=1e-9)


def test_target_epsilon_gives_a_noise_multiplier_within_the_target():
    cfg = load_config(SMOKE, ["dp.enabled=true", "dp.target_epsilon=8.0", "dp.accountant=rdp"], check_run_dir=False).dp
    ledger = dp.PrivacyLedger(cfg, 20, 8, 5)
    z = ledger.noise_multiplier
    assert dp.epsilon(20, 8, z, 5, cfg.delta, "rdp") <= 8.0
    assert dp.epsilon(20, 8, z - 0.01, 5, cfg.delta, "rdp") > 7.9  # not far more noise than needed


def test_bad_dp_values_and_strategies_whose_uploads_leak_are_refused():
    with pytest.raises(ConfigError, match="dp.delta"):
        load_config(SMOKE, ["dp.delta=1.5"], check_run_dir=False)
    with pytest.raises(ConfigError, match="dp.accountant"):
        load_config(SMOKE, ["dp.accountant=prv"], check_run_dir=False)
    with pytest.raises(ConfigError, match="'clip2fl'"):
        load_config(SMOKE, ["dp.enabled=true", "federated.strategy=clip2fl"], check_run_dir=False)


def test_dp_with_creff_is_one_line_and_exit_2_from_the_cli(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mllmfl_dist",
            "federate",
            str(SMOKE),
            "--set",
            f"run.root={tmp_path}",
            "--set",
            "dp.enabled=true",
            "--set",
            "federated.strategy=creff",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dp.enabled" in lines[0] and "'creff'" in lines[0]
    assert not (tmp_path / "smoke").exists()


def test_a_run_saved_before_dp_existed_refuses_a_resume_with_dp_on():
    old = load_config(SMOKE, check_run_dir=False).to_dict()
    del old["dp"]
    on = load_config(SMOKE, ["dp.enabled=true"], check_run_dir=False).to_dict()
    assert resume_differences(old, load_config(SMOKE, check_run_dir=False).to_dict()) == []
    assert resume_differences(old, on) == ["dp.enabled: False -> True"]


def test_one_and_three_processes_end_with_the_same_model_with_dp_on(tmp_path):
    sets = ["federated.rounds=2", "dp.enabled=true", "dp.clip_norm=0.5", "dp.noise_multiplier=0.5"]
    one = federate(1, tmp_path, "one", *sets)
    three = federate(3, tmp_path, "three", *sets)
    assert max_abs_difference(final_model(one), final_model(three)) <= 1e-5
    rounds = [json.loads(line) for line in (one / "rounds.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"] for r in rounds]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    metrics = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["dp_epsilon"] == eps[-1]
    summary = json.loads((one / "summary.json").read_text())
    assert summary["dp"]["epsilon"] == pytest.approx(eps[-1]) and summary["dp"]["noise_multiplier"] == 0.5


def cli_federate(tmp_path, *sets: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "mllmfl_dist",
        "federate",
        str(SMOKE),
        "--set",
        f"run.root={tmp_path}",
        "--set",
        "log.progress=false",
        "--set",
        "log.tensorboard=false",
    ]
    for item in sets:
        argv += ["--set", item]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_dp_with_feddyn_is_one_line_and_exit_2_from_the_cli(tmp_path):
    # FedDyn's server step sums the clients' raw deltas: outside the clipped, noised mean.
    assert_one_line_exit_2(
        cli_federate(tmp_path, "dp.enabled=true", "federated.strategy=feddyn"), "dp.enabled", "'feddyn'"
    )
    assert not (tmp_path / "smoke").exists()


def test_a_plugin_overriding_a_dp_sensitive_hook_without_declaring_dp_compatible_is_refused():
    from mllmfl_dist.config.plugins import register_strategy, unregister_strategy
    from mllmfl_dist.fl.strategies import FedAvg

    class Undeclared(FedAvg):  # inherits FedAvg's dp_compatible = True, which does not vouch for its own step
        name = "undeclared_step"

        def server_update(self, current, client_mean, trainable_mask, sums):
            return client_mean.clone()

    class Declared(Undeclared):
        name = "declared_step"
        dp_compatible = True

    class StateOnly(FedAvg):
        name = "state_only"

        def client_state_shapes(self, model):
            return {"x": (1,)}

    class LossOnly(FedAvg):  # a local objective of its own: inside the guarantee
        name = "loss_only"

        def local_loss(self, model, logits, labels, global_params, inputs=None):
            return super().local_loss(model, logits, labels, global_params, inputs)

    for cls in (Undeclared, Declared, StateOnly, LossOnly):
        register_strategy(cls)
    try:
        with pytest.raises(ConfigError, match=r"'undeclared_step'.*overrides server_update.*dp_compatible") as err:
            load_config(SMOKE, ["dp.enabled=true", "federated.strategy=undeclared_step"], check_run_dir=False)
        assert "\n" not in str(err.value)
        with pytest.raises(ConfigError, match=r"'state_only'.*overrides client_state_shapes"):
            load_config(SMOKE, ["dp.enabled=true", "federated.strategy=state_only"], check_run_dir=False)
        for name in ("declared_step", "loss_only", "fedavg", "fedprox", "fedadam"):
            load_config(SMOKE, ["dp.enabled=true", f"federated.strategy={name}"], check_run_dir=False)
        load_config(SMOKE, ["federated.strategy=undeclared_step"], check_run_dir=False)  # without DP: fine
        for name in ("scaffold", "fednova", "feddyn", "creff"):
            with pytest.raises(ConfigError, match=f"'{name}'"):
                load_config(SMOKE, ["dp.enabled=true", f"federated.strategy={name}"], check_run_dir=False)
    finally:
        for cls in (Undeclared, Declared, StateOnly, LossOnly):
            unregister_strategy(cls.name)


@pytest.mark.parametrize(
    "sets, words",
    [
        (["dp.noise_multiplier=0"], ["dp.noise_multiplier", "dp.target_epsilon"]),
        (["dp.noise_multiplier=0", "dp.accountant=pld"], ["dp.noise_multiplier"]),
        (["dp.target_epsilon=0.001"], ["dp.target_epsilon = 0.001", "federated.rounds", "dp.delta"]),
        (["dp.target_epsilon=1e9", "federated.rounds=2"], ["dp.target_epsilon", "dp.noise_multiplier instead"]),
    ],
)
def test_dp_settings_no_accountant_can_run_are_one_line_and_exit_2_without_a_traceback(tmp_path, sets, words):
    """rdp with z = 0 divided by zero and an unreachable target raised brentq's ValueError, on rank 0 alone."""
    assert_one_line_exit_2(cli_federate(tmp_path, "dp.enabled=true", *sets), *words)
    assert not (tmp_path / "smoke" / "federated" / "checkpoint.pt").exists()


def test_dp_adds_no_noise_to_frozen_parameters_and_they_stay_bit_identical():
    from mllmfl_dist.fl.aggregation import accumulate_, new_accumulator
    from mllmfl_dist.fl.strategies import FedAvg, StrategyArgs
    from mllmfl_dist.config import FederatedConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    model[0].requires_grad_(False)  # a frozen first layer
    layout = FlatLayout.of_module(model)
    central = dp.CentralDP.of_module(model, clip_norm=1.0, noise_multiplier=2.0, seed=3)
    start = layout.flatten(model.state_dict())
    frozen = torch.zeros(layout.numel, dtype=torch.bool)
    for key in ("0.weight", "0.bias"):
        i = layout.keys.index(key)
        frozen[layout.offsets[i] : layout.offsets[i + 1]] = True
    acc = new_accumulator(layout.numel)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # three clients: only what they train (and the BatchNorm statistics) moves
        state = start.clone()
        state[~frozen] += torch.randn(int((~frozen).sum()), dtype=torch.float64, generator=gen)
        accumulate_(acc, central.clip(start, state), 1)
    mean = central.noisy_mean(acc, 1)
    new = FedAvg(StrategyArgs(FederatedConfig(), 0)).server_update(start, mean, layout.trainable_mask, {})
    assert torch.equal(new[frozen], start[frozen])
    views = layout.views(new - start)
    assert float(views["2.weight"].abs().min()) > 0 and float(views["1.running_mean"].abs().min()) > 0
