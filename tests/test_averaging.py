"""Phase 3 building blocks: uniform averages, BN statistics recomputed (not averaged)."""
from __future__ import annotations

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
