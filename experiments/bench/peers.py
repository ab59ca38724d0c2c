"""The pure-PyTorch Mamba / Mamba-2 layers a CPU user would pick instead of ssmkit's, for the benchmarks.

Each peer is built from a tiny config (no download) at the benchmark's width and state size and
gets the weights of the ssmkit layer it is compared with (the parameter names are the public
ones on every side), so a correctness check can compare outputs before anything is timed.

- `mamba-hf`: `transformers` `MambaMixer` on CPU: its recurrent fallback, one Python step per token
  (the path `transformers` takes without the CUDA kernels and without `use_mambapy`).
- `mamba-hf-pscan`: the same mixer with `use_mambapy=True`, which routes the scan through the
  `mambapy` parallel scan when `mambapy` is installed (its fastest CPU setting).
- `mamba-mambapy`: `mambapy.mamba.MambaBlock` with `pscan=True` (the package's default).
- `mamba2-hf`: `transformers` `Mamba2Mixer` on CPU: its chunked PyTorch SSD fallback.
`mambapy.mamba2` needs the `mamba_ssm` CUDA package, so there is no `mambapy` Mamba-2 peer.
"""
from __future__ import annotations

import importlib.util

from torch import nn

PEERS = {  # name -> (ssmkit layer it stands in for, package it needs)
    "mamba-hf": ("mamba", "transformers"),
    "mamba-hf-pscan": ("mamba", "transformers"),
    "mamba-mambapy": ("mamba", "mambapy"),
    "mamba2-hf": ("mamba2", "transformers"),
}
HEADDIM = 64


class PeerUnavailable(Exception):
    """The peer's package is missing or cannot run here; the message says why."""


def missing(name: str) -> str | None:
    """Why peer `name` cannot run (None when it can)."""
    pkg = PEERS[name][1]
    if importlib.util.find_spec(pkg) is None:
        return f"{pkg} is not installed"
    if name == "mamba-hf-pscan" and importlib.util.find_spec("mambapy") is None:
        return "mambapy is not installed (transformers' use_mambapy needs it)"
    if name == "mamba-mambapy" and importlib.util.find_spec("einops") is None:
        return "einops is not installed (mambapy imports it)"
    return None


def ours(layer: str, d_model: int, d_state: int, *, device: str) -> nn.Module:
    """The ssmkit layer of the benchmark: Mamba(d_model, d_state) or Mamba2(d_model, d_state, headdim 64)."""
    if layer == "mamba":
        from ssm.layers.mamba import Mamba
        return Mamba(d_model, d_state, device=device)
    from ssm.layers.mamba2 import Mamba2
    return Mamba2(d_model, d_state, headdim=HEADDIM, device=device)


def build(name: str, d_model: int, d_state: int, *, device: str, weights_from: nn.Module | None = None) -> nn.Module:
    """Peer `name` at width d_model and state size d_state, with the weights of `weights_from`."""
    why = missing(name)
    if why:
        raise PeerUnavailable(why)
    if name == "mamba-mambapy":
        from mambapy.mamba import MambaBlock, MambaConfig
        peer = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, pscan=True))
    elif name in ("mamba-hf", "mamba-hf-pscan"):
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer
        cfg = MambaConfig(hidden_size=d_model, state_size=d_state, expand=2, conv_kernel=4, num_hidden_layers=1,
                          vocab_size=16, use_mambapy=name == "mamba-hf-pscan", use_associative_scan=False)
        peer = MambaMixer(cfg, layer_idx=0)
    else:
        from transformers import Mamba2Config
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
        heads = 2 * d_model // HEADDIM
        cfg = Mamba2Config(hidden_size=d_model, state_size=d_state, expand=2, head_dim=HEADDIM, num_heads=heads,
                           n_groups=1, conv_kernel=4, chunk_size=256, num_hidden_layers=1, vocab_size=16)
        peer = Mamba2Mixer(cfg, layer_idx=0)
    peer = peer.to(device)
    if weights_from is not None:
        peer.load_state_dict(weights_from.state_dict(), strict=True)
    return peer
