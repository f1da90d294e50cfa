"""BatchNorm as the paper handles it: BN parameters outside the spectrum, BN in eval mode for Hessian products."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from prunelimit import hessian_operator
from prunelimit.params import prunable_parameters


def _bn_net() -> nn.Module:
    """Conv(1->2, 3x3) -> BN -> ReLU -> Linear(32 -> 3), float64, BN statistics and affine set by construction."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        bn = net[1]
        bn.running_mean.copy_(torch.tensor([0.25, -0.5], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor([0.5, 2.0], dtype=torch.float64))
    return net


def test_bn_parameters_are_outside_the_operator_and_products_use_eval_mode():
    net = _bn_net().train()  # left in train mode: the operator must switch BN to its running statistics itself
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.arange(10) % 3
    loss_fn = nn.CrossEntropyLoss()
    op = hessian_operator(net, loss_fn, [(x[:6], y[:6]), (x[6:], y[6:])], cache_graph=False)
    non_bn = sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert op.dim == non_bn == 2 * 9 + 32 * 3
    assert all(p is not net[1].weight and p is not net[1].bias for p in op.params)

    names = ["0.weight", "4.weight"]
    shapes = [net[0].weight.shape, net[4].weight.shape]
    w0 = torch.cat([net[0].weight.detach().reshape(-1), net[4].weight.detach().reshape(-1)])

    def loss_at(flat: torch.Tensor, train_mode: bool) -> torch.Tensor:
        parts = dict(zip(names, (flat[:18].view(shapes[0]), flat[18:].view(shapes[1]))))
        net.train(train_mode)
        state = {**{k: v.detach() for k, v in net.named_parameters()}, **{k: b.clone() for k, b in net.named_buffers()}, **parts}
        return loss_fn(functional_call(net, state, (x,)), y)

    running = net[1].running_mean.clone()
    dense_eval = torch.autograd.functional.hessian(lambda w: loss_at(w, False), w0)
    dense_train = torch.autograd.functional.hessian(lambda w: loss_at(w, True), w0)
    net.train()
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64)
    hv = op.matvec(v)
    assert torch.allclose(hv, dense_eval @ v, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(hv, dense_train @ v, rtol=1e-3, atol=1e-6)  # the check can tell the modes apart
    assert net.training and torch.equal(net[1].running_mean, running)  # mode restored, statistics untouched
