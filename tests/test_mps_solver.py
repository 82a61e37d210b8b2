"""--perspective on MPS before torch 2.7, which has no `linalg_solve_ex` (pytorch#148547): the [n, 8, 8]
homography systems are solved on the CPU there. Checked on the CPU: the rule, the same matrices either
way, and the augmentation going through the fallback when the solver refuses the run's device."""

import pytest
import torch
from fixtures.devices import NoFloat64

from trainer import augment as aug
from trainer.augment import AugmentConfig, augment, perspective_matrices
from trainer.device import solves_on_device

PERSPECTIVE = AugmentConfig(rotate=10, perspective=1.0, perspective_scale=0.3, crop=0.5)


@pytest.mark.parametrize("device_type, version, on_device", [
    ("mps", (2, 6), False), ("mps", (2, 5), False), ("mps", (2, 7), True), ("mps", (2, 11), True),
    ("mps", (3, 0), True), ("cuda", (2, 6), True), ("cuda", (2, 11), True), ("cpu", (2, 6), True),
])
def test_rule_solves_on_the_cpu_only_for_mps_before_2_7(device_type, version, on_device):
    assert solves_on_device(device_type, version) is on_device


def test_cpu_solve_gives_the_same_matrices(monkeypatch):
    on_device = perspective_matrices(PERSPECTIVE, 64, torch.Generator().manual_seed(3), torch.device("cpu"))
    monkeypatch.setattr(aug, "solves_on_device", lambda device_type, version=None: False, raising=False)
    via_cpu = perspective_matrices(PERSPECTIVE, 64, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert via_cpu.dtype == torch.float32 and via_cpu.shape == (64, 3, 3)
    torch.testing.assert_close(via_cpu, on_device, rtol=0, atol=0)


def test_perspective_works_where_the_device_has_no_solver(monkeypatch):
    """The run's device is MPS on torch 2.6: solve_ex raises there, as it does on a Mac, for any tensor
    that was not first moved to the CPU (CPU tensors stand in for MPS ones; `.cpu()` hands back a copy,
    as it does off the CPU)."""
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = augment(x, PERSPECTIVE, torch.Generator().manual_seed(1))

    real_cpu, real_solve_ex = torch.Tensor.cpu, torch.linalg.solve_ex
    moved: list[torch.Tensor] = []

    def cpu(self, *args, **kwargs):
        out = real_cpu(self, *args, **kwargs).clone()
        moved.append(out)
        return out

    def solve_ex(a, b, **kwargs):
        if not any(a is t for t in moved):
            raise NotImplementedError("The operator 'aten::_linalg_solve_ex.result' is not currently "
                                      "implemented for the MPS device.")
        return real_solve_ex(a, b, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.linalg, "solve_ex", solve_ex)
    monkeypatch.setattr(aug, "solves_on_device", lambda device_type, version=None: solves_on_device("mps", (2, 6)),
                        raising=False)
    with NoFloat64():  # nor on the way to the CPU and back: MPS has no float64
        out = augment(x, PERSPECTIVE, torch.Generator().manual_seed(1))
    assert moved, "the systems were not moved to the CPU"
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
