"""Phase 3 building blocks: uniform averages, BN statistics recomputed (not averaged)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from swap.averaging import average_models, average_state_dicts, bn_buffer_names, recompute_bn


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_average_of_known_state_dicts():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    c = {"w": torch.tensor([5.0, 1.0]), "n": torch.tensor(7)}
    avg = average_state_dicts([a, b, c])
    assert torch.equal(avg["w"], torch.tensor([3.0, 3.0]))
    assert avg["n"].item() == 3                     # integer entries are not averaged


def test_average_models_is_the_parameter_mean_and_leaves_inputs_alone():
    nets = [_net(s) for s in range(3)]
    before = [p.clone() for p in nets[0].parameters()]
    avg = average_models(nets)
    for name, p in avg.named_parameters():
        expected = torch.stack([dict(n.named_parameters())[name] for n in nets]).mean(0)
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, nets[0].parameters()))


def test_bn_buffers_are_excluded_from_averaging():
    nets = [_net(s) for s in range(2)]
    for i, n in enumerate(nets):
        n[1].running_mean.fill_(float(i * 10))
    names = bn_buffer_names(nets[0])
    assert names == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    avg = average_state_dicts([n.state_dict() for n in nets], names)
    assert torch.equal(avg["1.running_mean"], torch.zeros(4))       # first dict's, to be recomputed
    torch.testing.assert_close(avg["0.weight"], (nets[0][0].weight + nets[1][0].weight) / 2)


def test_recomputed_bn_equals_batch_statistics_of_the_data():
    """For a 1-layer net (BN on the input), the recomputed running mean/var are the data's own
    mean and (unbiased) variance; with equal batches the mean is exact."""
    torch.manual_seed(0)
    data = torch.randn(512, 5) * torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0]) + torch.arange(5.0)
    net = nn.Sequential(nn.BatchNorm1d(5))
    net[0].running_mean.fill_(123.0)                 # stale statistics that must be discarded
    recompute_bn(net, [data])                        # one batch holding all the data
    torch.testing.assert_close(net[0].running_mean, data.mean(0))
    torch.testing.assert_close(net[0].running_var, data.var(0, unbiased=True))
    recompute_bn(net, list(data.split(128)))         # four equal batches
    torch.testing.assert_close(net[0].running_mean, data.mean(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(net[0].running_var, data.var(0, unbiased=True), rtol=1e-6, atol=1e-6)
    assert int(net[0].num_batches_tracked) == 4


def test_unequal_batches_give_the_data_statistics_where_update_bn_does_not():
    """Exact sums: batches of 500 and 12 still give the data's variance; swa_utils.update_bn
    averages the per-batch variances and misses it (the reason we do not call it)."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(1)
    data = torch.cat([torch.randn(500, 3), 5 + 3 * torch.randn(12, 3)])
    ours, theirs = nn.Sequential(nn.BatchNorm1d(3)), nn.Sequential(nn.BatchNorm1d(3))
    recompute_bn(ours, [data[:500], data[500:]])
    update_bn([data[:500], data[500:]], theirs)
    torch.testing.assert_close(ours[0].running_var, data.var(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[0].running_mean, data.mean(0), rtol=1e-6, atol=1e-6)
    assert (theirs[0].running_var - data.var(0)).abs().max() > 0.1


class _DictNet(nn.Module):
    """A model of the data contract's dict input: model(**x), with a BN2d without affine and a
    BN1d after a second input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn2d = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, image, features):
        return self.bn2d(self.conv(image)).mean((2, 3)).sum(1) + self.bn1d(features).sum(1)


def test_dict_inputs_batch_cap_and_models_without_bn():
    torch.manual_seed(2)
    batches = [({"image": torch.randn(8, 2, 6, 6), "features": torch.randn(8, 4) * (i + 1)}, torch.zeros(8))
               for i in range(5)]
    net = _DictNet()
    recompute_bn(net, batches, max_batches=2)
    feats = torch.cat([b[0]["features"] for b in batches[:2]])
    torch.testing.assert_close(net.bn1d.running_var, feats.var(0), rtol=1e-6, atol=1e-6)
    assert int(net.bn1d.num_batches_tracked) == 2 and net.bn2d.weight is None
    conv = torch.cat([net.conv(b[0]["image"]) for b in batches[:2]]).detach()
    torch.testing.assert_close(net.bn2d.running_mean, conv.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))          # no BN: no pass at all
    before = [t.clone() for t in plain.state_dict().values()]
    assert recompute_bn(plain, iter(lambda: (_ for _ in ()).throw(AssertionError("read")), None)) is plain
    assert all(torch.equal(a, b) for a, b in zip(before, plain.state_dict().values()))


def test_sync_batchnorm_is_recomputed_outside_a_process_group():
    torch.manual_seed(3)
    data = torch.randn(64, 3, 4, 4) * 2 + 1
    net = nn.Sequential(nn.SyncBatchNorm(3))
    recompute_bn(net, list(data.split(16)))
    torch.testing.assert_close(net[0].running_mean, data.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net[0].running_var, data.transpose(0, 1).reshape(3, -1).var(1), rtol=1e-6, atol=1e-6)


def bn_rank(_: int = 0) -> list[dict]:
    """A launched rank: recompute a small CNN's BN statistics from this rank's share of 6 batches."""
    from swap import distributed
    from swap.models import build_model

    d = distributed.setup("cpu")
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(32, 1, 28, 28, generator=g) for _ in range(6)]
    recompute_bn(model, batches[d.rank::d.world_size], distributed=d.world_size > 1)
    out = distributed.all_gather_objects({k: v.clone() for k, v in model.state_dict().items()
                                          if k in bn_buffer_names(model)})
    distributed.teardown()
    return out


def test_two_ranks_give_the_statistics_of_one_process(monkeypatch):
    import os
    from pathlib import Path

    from swap import distributed

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    single = bn_rank()[0]
    ranks = distributed.launch(bn_rank, 2, 0)
    for k, v in single.items():
        torch.testing.assert_close(ranks[0][k].double(), v.double(), rtol=0, atol=1e-6, msg=k)
        assert torch.equal(ranks[0][k], ranks[1][k])


def test_greedy_soup_adds_a_candidate_only_if_the_held_out_score_does_not_fall():
    """Wortsman et al. 2022, Recipe 1, on 1-parameter models scored by -|w - 1.5|: the candidates
    1 and 2 (tied best) make a soup of 1.5; adding 10 would move it to 4.33, so 10 is left out."""
    from swap.averaging import greedy_soup
    template = nn.Linear(1, 1, bias=False)
    candidates = [{"weight": torch.tensor([[w]])} for w in (1.0, 10.0, 2.0)]
    prepared = []
    soup, kept, singles, best = greedy_soup(template, candidates, lambda m: -abs(m.weight.item() - 1.5),
                                            prepared.append)
    assert singles == [-0.5, -8.5, -0.5] and kept == [0, 2] and best == 0.0
    assert soup.weight.item() == 1.5 and len(prepared) == 3          # soups {0}, {0, 2}, {0, 2, 1} were prepared
    with pytest.raises(ValueError):
        greedy_soup(template, [], lambda m: 0.0, lambda m: None)
