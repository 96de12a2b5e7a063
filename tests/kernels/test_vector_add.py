"""common.kernels.vector_add against torch's add: ragged sizes, fp32 and fp16, bad input.

On a CPU the kernel runs in Triton's interpreter on small sizes; the `gpu` test runs it compiled at a real
size. An add rounds once in the output dtype either way, so the results must be bit-identical to torch's.
"""

from __future__ import annotations

import pytest
import torch

from common.kernels import INTERPRETED
from common.kernels.vector_add import BLOCK_SIZE, vector_add, vector_add_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1,), (BLOCK_SIZE,), (BLOCK_SIZE + 1,), (3 * BLOCK_SIZE - 7,), (37, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    y = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    z = vector_add(x, y)
    assert z.shape == x.shape and z.dtype == dtype
    torch.testing.assert_close(z, vector_add_reference(x, y), rtol=0, atol=0)


def test_empty_input() -> None:
    x = torch.empty(0, device=DEVICE)
    assert vector_add(x, x).shape == (0,)


def test_bad_input_says_what_is_wrong() -> None:
    x = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="same shape"):
        vector_add(x, torch.randn(4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        vector_add(x[::2], x[1::2])
    with pytest.raises(TypeError, match="dtype"):
        vector_add(x.long(), x.long())


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="compiled kernels only")
def test_large_on_gpu() -> None:
    x, y = torch.randn(2, 10_000_019, device="cuda").unbind()
    x, y = x.contiguous(), y.contiguous()
    torch.testing.assert_close(vector_add(x, y), x + y, rtol=0, atol=0)
    xb, yb = x.bfloat16(), y.bfloat16()
    torch.testing.assert_close(vector_add(xb, yb), xb + yb, rtol=0, atol=0)
