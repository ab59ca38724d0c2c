"""The attention rows of the layer benchmark run PyTorch's fused SDPA kernel, not the unfused
math fallback (which a dtype, layout or backend setting could select, making the baseline slower)."""
import pytest
import torch

from experiments.bench.layers import build, sdpa_kernels


@pytest.mark.parametrize("layer", ["attention", "transformer"])
def test_attention_rows_use_the_fused_cpu_kernel_forward_and_backward(layer):
    m = build(layer, 128, None, device="cpu")
    x = torch.randn(1, 64, 128, requires_grad=True)

    def call():
        out = m(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    names = sdpa_kernels(call)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names, names
    assert not any("math" in n for n in names), names


def test_the_math_fallback_is_told_apart():
    # Guards the test above: the unfused math kernel shows up under its own name.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 2, 16, 8)
    with sdpa_kernel(SDPBackend.MATH):
        names = sdpa_kernels(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in names, names
    assert any("math" in n for n in names), names
