"""Analysis: plane geometry, the landscape evaluator, the cosine, and the figures."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from swap.analysis.cosine import cosine, minibatch_gradient
from swap.analysis.landscape import Plane, evaluate_point, flat_params, grid_axes
from swap.analysis.plots import plot_cosine, plot_landscape, plot_run
from swap.averaging import recompute_bn
from swap.data import ImageDataset

TOL = 1e-9   # float64 geometry


def _three_points(p=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=g, dtype=torch.float64) for _ in range(3)]


def test_basis_is_orthonormal_and_points_map_back():
    a, b, c = _three_points()
    plane = Plane.through(a, b, c)
    assert abs(plane.u.norm().item() - 1) < TOL and abs(plane.v.norm().item() - 1) < TOL
    assert abs(torch.dot(plane.u, plane.v).item()) < TOL
    for x in (a, b, c):
        alpha, beta = plane.coords(x)
        assert torch.allclose(plane.point(alpha, beta), x, atol=1e-9, rtol=0)   # in the plane, exactly back
    assert plane.coords(a) == (0.0, 0.0)
    assert abs(plane.coords(b)[1]) < TOL and plane.coords(b)[0] > 0            # b lies on the u axis


def test_collinear_points_are_refused():
    a, b, _ = _three_points()
    try:
        Plane.through(a, b, a + 2 * (b - a))
    except ValueError as exc:
        assert "collinear" in str(exc)
    else:
        raise AssertionError("collinear points accepted")


def test_grid_spans_the_points_with_margin():
    alphas, betas = grid_axes([(0.0, 0.0), (2.0, 0.0), (1.0, 3.0)], size=5, margin=0.5)
    assert alphas[0] == -1.0 and alphas[-1] == 3.0 and betas[0] == -1.5 and betas[-1] == 4.5


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_evaluator_equals_direct_evaluation_with_recomputed_bn():
    g = torch.Generator().manual_seed(1)
    train = ImageDataset(torch.randint(0, 256, (96, 1, 6, 6), generator=g, dtype=torch.uint8), torch.randint(0, 3, (96,), generator=g), 3)
    test = ImageDataset(torch.randint(0, 256, (40, 1, 6, 6), generator=g, dtype=torch.uint8), torch.randint(0, 3, (40,), generator=g), 3)
    mean, std = train.channel_stats()
    base = flat_params(_tiny())
    vecs = [base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in range(3)]
    plane = Plane.through(*vecs)
    vec = plane.point(0.3, -0.7)
    train_err, test_err = evaluate_point(_tiny(), vec, train, train, test, (mean, std), bn_batch_size=32)
    # direct: write the vector parameter by parameter, recompute BN over the same batches, count mistakes
    direct = _tiny()
    offset = 0
    with torch.no_grad():
        for p in direct.parameters():
            p.copy_(vec[offset:offset + p.numel()].view_as(p).float())
            offset += p.numel()
    norm = lambda d: (d.images.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    recompute_bn(direct, [norm(train)[i:i + 32] for i in range(0, 96, 32)])
    direct.eval()
    with torch.no_grad():
        expect_train = 100.0 * (direct(norm(train)).argmax(1) != train.labels).sum().item() / len(train)
        expect_test = 100.0 * (direct(norm(test)).argmax(1) != test.labels).sum().item() / len(test)
    assert abs(train_err - expect_train) < 1e-9 and abs(test_err - expect_test) < 1e-9


def test_cosine_of_itself_and_negation():
    v = torch.randn(50)
    assert abs(cosine(v, v) - 1) < 1e-12 and abs(cosine(v, -v) + 1) < 1e-12
    assert abs(cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))) < 1e-12


def test_minibatch_gradient_matches_autograd_and_leaves_bn_alone():
    model = _tiny()
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    before = model[1].running_mean.clone()
    g = minibatch_gradient(model, x, y)
    assert torch.equal(model[1].running_mean, before)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    assert torch.allclose(g, expected)


def test_figures_are_written(tmp_path):
    records = ([{"phase": "phase1", "worker": None, "epoch": e, "lr": 0.1 * e, "test_acc": 80 + e, "wall_s": 10.0 * e}
                for e in range(1, 4)]
               + [{"phase": "phase2", "worker": w, "epoch": e, "lr": 0.05 / e, "test_acc": 84 + e + w, "wall_s": 30.0 + 5 * e}
                  for w in range(2) for e in range(1, 3)]
               + [{"phase": "average", "worker": None, "epoch": e, "test_acc": 86 + e, "wall_s": 30.0 + 5 * e} for e in range(1, 3)]
               + [{"phase": "phase3", "worker": None, "epoch": None, "test_acc": 89.0, "wall_s": 45.0}])
    files = plot_run(records, tmp_path / "curves", svg=True)
    assert [f.suffix for f in files] == [".png", ".svg"] and all(f.stat().st_size > 10_000 for f in files)
    grid = {"alphas": np.linspace(-1, 2, 5), "betas": np.linspace(-1, 2, 5),
            "train_err": np.random.default_rng(0).random((5, 5)), "test_err": np.random.default_rng(1).random((5, 5)),
            "coords": np.array([[0, 0], [1, 0], [0.5, 1]]), "names": np.array(["phase1", "worker0", "swap"])}
    assert plot_landscape(grid, tmp_path / "plane")[0].stat().st_size > 10_000
    rows = [{"worker": w, "step": s, "cosine": 0.1 * w - 0.01 * s} for w in range(2) for s in range(0, 50, 10)]
    assert plot_cosine(rows, tmp_path / "cos")[0].stat().st_size > 10_000
