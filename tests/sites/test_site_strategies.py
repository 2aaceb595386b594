"""Site side of FedProx, SCAFFOLD and personalized layers, with real Opacus."""

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from medfed.errors import ConfigError, DataError
from medfed.sites.personalization import (
    LocalLayerStore,
    merge_global,
    split_state_dict,
)
from medfed.sites.regularizers import apply_proximal_step, proximal_penalty
from medfed.sites.scaffold import ScaffoldSite
from medfed.sites.tensor_files import load_tensors, save_tensors_atomic


class Scalar(nn.Module):
    """One parameter ``w``; the loss 0.5 * w^2 has gradient w."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))

    def loss(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.w**2)


def test_proximal_penalty_by_hand() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    global_weights = {"weight": np.zeros((1, 2), np.float32)}

    penalty = proximal_penalty(model, global_weights, mu=0.5)
    penalty.backward()

    # 0.5 / 2 * (1 + 4) = 1.25; gradient mu * (w - w_global) = (0.5, 1.0).
    assert penalty.item() == pytest.approx(1.25)
    assert model.weight.grad is not None
    np.testing.assert_allclose(model.weight.grad.numpy(), [[0.5, 1.0]])


def test_proximal_step_by_hand() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    global_weights = {"weight": np.array([[0.0, 1.0]], np.float32)}
    apply_proximal_step(model, global_weights, mu=0.5, learning_rate=0.1)
    # (w + 0.05 * w_global) / 1.05
    expected = [[1.0 / 1.05, (2.0 + 0.05) / 1.05]]
    np.testing.assert_allclose(model.weight.detach().numpy(), expected, rtol=1e-6)


def test_proximal_penalty_rejects_shape_mismatch() -> None:
    model = nn.Linear(2, 1, bias=False)
    with pytest.raises(ConfigError, match=r"'weight' has shape \[2\]"):
        proximal_penalty(model, {"weight": np.zeros(2, np.float32)}, mu=0.1)


def make_private(model: nn.Module, features: torch.Tensor, labels: torch.Tensor):
    """Wrap with Opacus; zero noise and a huge clip make its step the plain one."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(features, labels), batch_size=len(labels)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
    )


def test_proximal_gradient_is_lost_under_opacus() -> None:
    # Why the site trainer must use apply_proximal_step under DP: Opacus
    # replaces p.grad by its per-sample sum, dropping the penalty's gradient.
    torch.manual_seed(0)
    features = torch.randn(8, 2)
    labels = torch.randn(8, 1)
    global_weights = {"weight": np.full((1, 2), 5.0, np.float32)}
    final = []
    for mu in (0.0, 10.0):
        model = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        private, optimizer, loader = make_private(model, features, labels)
        batch_features, batch_labels = next(iter(loader))
        loss = nn.functional.mse_loss(private(batch_features), batch_labels)
        loss = loss + proximal_penalty(private, global_weights, mu=mu)
        loss.backward()
        optimizer.step()
        final.append(model.weight.detach().clone())
    torch.testing.assert_close(final[0], final[1])


def train_scalar(scaffold: ScaffoldSite, *, private: bool) -> np.ndarray:
    model = Scalar(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model.loss().backward()
        if private:
            optimizer.step()
            scaffold.apply_correction_step(model, learning_rate=0.1)
        else:
            scaffold.correct_gradients(model)
            optimizer.step()
    return model.w.detach().numpy().copy()


@pytest.mark.parametrize("private", [False, True])
def test_scaffold_site_by_hand(tmp_path: Path, private: bool) -> None:
    state_path = tmp_path / "scaffold.safetensors"
    save_tensors_atomic(state_path, {"w": np.array([0.1])})
    global_weights = {"w": np.array([1.0], np.float32)}
    scaffold = ScaffoldSite.load(state_path, global_weights, {"w": np.array([0.3])})

    # Correction c - c_i = 0.2. Loss 0.5 w^2, lr 0.1, two steps from w = 1:
    # w = 1 - 0.1 * (1 + 0.2) = 0.88, then 0.88 - 0.1 * (0.88 + 0.2) = 0.772.
    local = train_scalar(scaffold, private=private)
    np.testing.assert_allclose(local, [0.772], rtol=1e-6)

    # Option II: c_i_new = 0.1 - 0.3 + (1 - 0.772) / (2 * 0.1) = 0.94.
    new_control, control_delta = scaffold.control_update(
        {"w": local}, local_steps=2, learning_rate=0.1
    )
    np.testing.assert_allclose(new_control["w"], [0.94], rtol=1e-6)
    np.testing.assert_allclose(control_delta["w"], [0.84], rtol=1e-6)
    assert control_delta["w"].dtype == np.float32

    scaffold.commit(new_control)
    np.testing.assert_allclose(load_tensors(state_path)["w"], [0.94], rtol=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scaffold.safetensors"]


def test_scaffold_site_starts_from_zeros(tmp_path: Path) -> None:
    global_weights = {"w": np.array([1.0], np.float32)}
    scaffold = ScaffoldSite.load(tmp_path / "none.safetensors", global_weights, None)
    np.testing.assert_array_equal(scaffold.correction["w"], [0.0])


def test_scaffold_site_correction_under_opacus(tmp_path: Path) -> None:
    torch.manual_seed(0)
    features = torch.randn(8, 2)
    labels = torch.randn(8, 1)
    global_weights = {
        "weight": np.zeros((1, 2), np.float32),
        "bias": np.zeros(1, np.float32),
    }
    server = {"weight": np.array([[1.0, -1.0]]), "bias": np.array([0.5])}
    scaffold = ScaffoldSite.load(tmp_path / "c.safetensors", global_weights, server)

    results = []
    for private in (False, True):
        model = nn.Linear(2, 1)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        if private:
            wrapped, optimizer, _ = make_private(model, features, labels)
        else:
            wrapped = model
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.mse_loss(wrapped(features), labels)
        loss.backward()
        if private:
            optimizer.step()
            scaffold.apply_correction_step(wrapped, learning_rate=0.1)
        else:
            scaffold.correct_gradients(wrapped)
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, private in zip(*results, strict=True):
        torch.testing.assert_close(plain, private)


def test_scaffold_site_rejects_foreign_state(tmp_path: Path) -> None:
    state_path = tmp_path / "c.safetensors"
    save_tensors_atomic(state_path, {"v": np.zeros(1)})
    with pytest.raises(ConfigError, match=r"site control variate has tensors \['v'\]"):
        ScaffoldSite.load(state_path, {"w": np.zeros(1, np.float32)}, None)


def test_load_tensors_rejects_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="is not a readable safetensors file"):
        load_tensors(path)


STATE = {
    "conv.weight": np.ones((2, 2), np.float32),
    "bn.weight": np.full(2, 2.0, np.float32),
    "bn.running_mean": np.full(2, 3.0, np.float32),
    "head.bias": np.zeros(1, np.float32),
}


def test_split_state_dict_by_pattern() -> None:
    shared, local = split_state_dict(STATE, ["bn.*"])
    assert sorted(shared) == ["conv.weight", "head.bias"]
    assert sorted(local) == ["bn.running_mean", "bn.weight"]


def test_split_state_dict_rejects_unmatched_pattern() -> None:
    with pytest.raises(
        ConfigError, match=r"pattern 'batchnorm.*' matches no parameter"
    ):
        split_state_dict(STATE, ["batchnorm.*"])


def test_local_layers_round_trip(tmp_path: Path) -> None:
    store = LocalLayerStore(tmp_path / "local.safetensors")
    assert store.load() is None
    # First round: the initial global model carries every parameter.
    first = merge_global(STATE, store.load(), ["bn.*"])
    np.testing.assert_array_equal(first["bn.weight"], STATE["bn.weight"])

    trained = {key: value + 1 for key, value in first.items()}
    shared, local = split_state_dict(trained, ["bn.*"])
    store.save(local)

    # Later rounds: the global model has only shared layers.
    new_global = {key: value * 10 for key, value in shared.items()}
    merged = merge_global(new_global, store.load(), ["bn.*"])
    assert sorted(merged) == sorted(STATE)
    np.testing.assert_array_equal(merged["bn.weight"], STATE["bn.weight"] + 1)
    np.testing.assert_array_equal(
        merged["conv.weight"], (STATE["conv.weight"] + 1) * 10
    )


def test_merge_global_rejects_stale_local_layer() -> None:
    with pytest.raises(
        ConfigError, match=r"stored local layer 'bn.weight' matches none"
    ):
        merge_global(STATE, {"bn.weight": np.zeros(2, np.float32)}, ["norm.*"])


def test_local_patterns_reject_plain_string() -> None:
    with pytest.raises(
        ConfigError, match=r"must be a list of name patterns, got 'bn.*'"
    ):
        split_state_dict(STATE, "bn.*")


def test_scaffold_control_update_with_momentum(tmp_path: Path) -> None:
    # The loss g . w has the constant gradient g, so after K steps of SGD with
    # momentum, (x - y) / (K_eff * lr) is exactly g and c_i_new = g.
    gradient = torch.tensor([0.5, -2.0])
    weights = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weights], lr=0.1, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        torch.sum(gradient * weights).backward()
        optimizer.step()
    global_weights = {"w": np.zeros(2, np.float32)}
    scaffold = ScaffoldSite.load(tmp_path / "c.safetensors", global_weights, None)

    new_control, _ = scaffold.control_update(
        {"w": weights.detach().numpy()}, local_steps=5, learning_rate=0.1, momentum=0.9
    )

    np.testing.assert_allclose(new_control["w"], gradient.numpy(), rtol=1e-5)


def test_scaffold_skips_uncorrected_layers(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    global_weights = {"weight": np.zeros((1, 2), np.float32)}
    server = {"weight": np.array([[1.0, 2.0]])}
    scaffold = ScaffoldSite.load(
        tmp_path / "c.safetensors", global_weights, server, uncorrected=["bias"]
    )

    scaffold.correct_gradients(model)

    torch.testing.assert_close(model.weight.grad, torch.tensor([[1.0, 2.0]]))
    assert model.bias.grad is None


def test_scaffold_rejects_unknown_layer(tmp_path: Path) -> None:
    global_weights = {"weight": np.zeros((1, 2), np.float32)}
    scaffold = ScaffoldSite.load(tmp_path / "c.safetensors", global_weights, None)
    with pytest.raises(ConfigError, match=r"model parameter 'bias' is not in"):
        scaffold.correct_gradients(nn.Linear(2, 1))
