#!/usr/bin/python3
"""TorchScript fixtures of tests/jit_test.cpp (the tests read the committed .pt files; no Python at test time).

Run with Debian's PyTorch (apt-get install python3-torch; /usr/bin/python3, not a virtualenv's):
    /usr/bin/python3 tests/data/torchscript/make_fixtures.py
Writes next to this file:
  net_scripted.pt, net_traced.pt  Net (Conv2d, GroupNorm, Conv1d, an attention block with LayerNorms, a
                                  Sequential feed-forward, a Linear head), torch.jit.script / torch.jit.trace
                                  of the same weights. tests/jit_test.cpp has the same architecture in
                                  torch::nn (NetImpl): keep the two in step.
  net_frozen.pt                   torch.jit.freeze of the scripted Net (weights inlined as constants).
  settings_scripted.pt, settings_traced.pt
                                  layers with every setting the host view reads (Conv3d stride, dilation with
                                  padding 'same', reflect padding, grouped conv, bias-free Linear) and the ones
                                  it skips (even kernel with 'same', multi-axis / non-affine norms, a Linear its
                                  forward never reads, one whose weight the parent reads directly).
  reference.pt                    a module whose buffers are the Net input and the eager outputs.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = float(dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        q = self.to_q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k = self.to_k(x).reshape(b, n, h, c // h).transpose(1, 2)
        v = self.to_v(x).reshape(b, n, h, c // h).transpose(1, 2)
        a = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.scale, dim=-1)
        return self.to_out(torch.matmul(a, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Net(nn.Module):
    """Input [B, 3, 8, 8] → [B, 10]."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.seq = nn.Conv1d(16, 16, 3, padding=1)
        self.block = Block(16, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = F.silu(self.norm(self.conv_in(x)))
        t = self.down(h).flatten(2)  # [B, 16 channels, 16 positions]
        t = (t + self.seq(t)).transpose(1, 2)
        return self.head(self.block(t).mean(1))


class Settings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.dilated = nn.Conv1d(4, 4, 3, dilation=2, padding="same")
        self.reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.even_same = nn.Conv2d(2, 2, 4, padding="same")
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.ln2 = nn.LayerNorm([4, 5])
        self.ln_plain = nn.LayerNorm(5, elementwise_affine=False)
        self.gn_plain = nn.GroupNorm(2, 4, affine=False)
        self.fc_nobias = nn.Linear(5, 3, bias=False)
        self.unused = nn.Linear(3, 3)
        self.direct = nn.Linear(5, 5)

    def forward(self, vid, seq, img, x):
        a = self.conv3d(vid).sum()
        b = self.dilated(seq).sum()
        c = self.grouped(self.reflect(img)).sum() + self.even_same(img).sum()
        y = self.gn_plain(self.ln_plain(self.ln2(x)))
        d = self.fc_nobias(F.linear(y, self.direct.weight, self.direct.bias)).sum()
        return a + b + c + d


def save(module, name):
    path = os.path.join(HERE, name)
    module.save(path)
    print(f"{name}: {os.path.getsize(path)} bytes")


def main():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    save(torch.jit.script(net), "net_scripted.pt")
    save(torch.jit.trace(net, (x,)), "net_traced.pt")
    save(torch.jit.freeze(torch.jit.script(net)), "net_frozen.pt")

    settings = Settings().eval()
    inputs = (torch.randn(1, 2, 3, 8, 8), torch.randn(1, 4, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 4, 5))
    save(torch.jit.script(settings), "settings_scripted.pt")
    save(torch.jit.trace(settings, inputs), "settings_traced.pt")

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("input", x)
            with torch.no_grad():
                self.register_buffer("output", net(x))

        def forward(self):
            return self.output

    save(torch.jit.script(Reference()), "reference.pt")


if __name__ == "__main__":
    main()
