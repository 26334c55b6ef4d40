"""CUDA only (skipped without a GPU; `benchmarks/gpu.sh` runs it): the connector reads a piece into a pinned staging
buffer and the device copies it straight from there, on the load stream, this rank's heads and layers as the strided
view they are of the buffer; the buffer is reused only once that copy is done. A head-major piece goes up raw and is
transposed (and dequantized) on the device."""

from __future__ import annotations

import pytest
import torch

from prefixgen.integrations.vllm.staging import StagingPool, upload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned staging path runs on CUDA only")

T, L, H, D = 48, 3, 4, 64  # tokens, layers, KV heads, head_dim of a piece


@pytest.mark.parametrize(
    ("heads", "layers"), [(range(0, 4), range(0, 3)), (range(2, 4), range(0, 3)), (range(1, 2), range(1, 3))]
)
def test_a_view_of_a_pinned_buffer_reaches_the_device_as_is(heads, layers):
    pool = StagingPool(T * L * 2 * H * D * 2, keep=1, pinned=True)
    staging = pool.acquire()
    assert staging.tensor.is_pinned()
    host = staging.tensor.view(torch.bfloat16).view(T, L, 2, H, D)
    host.copy_(torch.randn(T, L, 2, H, D).to(torch.bfloat16))
    view = host[8:40, layers.start : layers.stop, :, heads.start : heads.stop]  # [32, layers, 2, heads, D], strided
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_device = upload(view, torch.device("cuda"))
        done = torch.cuda.Event()
        done.record(stream)
    pool.release(staging, done)
    assert on_device.shape == view.shape and on_device.stride() == view.stride()
    again = pool.acquire()  # the same buffer, handed out only after the copy out of it is done
    assert again is staging and not again.events and done.query()
    assert torch.equal(on_device.cpu(), view)
    assert pool.made == 1


@pytest.mark.parametrize("fp8", [False, True])
def test_a_head_major_piece_goes_up_raw_and_is_transposed_on_the_device(fp8):
    """A head-major piece (format 5) leaves the pinned buffer as read; its transpose to vLLM's token-major rows (and
    fp8's dequantization) is made on the device, equal bit for bit to the same made on the host."""
    from prefixgen.store.reader import StoredKV

    n, h, B = 3, 2, 16  # blocks, this rank's heads, block tokens
    stored = torch.float8_e4m3fn if fp8 else torch.bfloat16
    pool = StagingPool(n * h * B * L * 2 * D * stored.itemsize, keep=1, pinned=True)
    staging = pool.acquire()
    raw = staging.tensor.view(stored).view(n, h, B, L, 2, D)  # as read: [blocks, heads, B, layers, 2, D]
    raw.copy_(torch.randn(n, h, B, L, 2, D).to(stored))
    scales = torch.rand(n, h, L, 2) + 0.5 if fp8 else None
    read = StoredKV(raw, scales, True, B, None, range(1, 3))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_device = read.to(upload(read.kv, torch.device("cuda")))
        rows = on_device.rows(torch.bfloat16)
    stream.synchronize()
    assert on_device.kv.is_contiguous() and rows.device.type == "cuda"
    assert rows.shape == (n * B, 2, 2, h, D)  # [tokens, layers 1-2, K/V, heads, D]
    assert torch.equal(rows.cpu(), read.rows(torch.bfloat16))
