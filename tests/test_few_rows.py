"""Few-row fp32 products: MKL on the plain weight or oneDNN's packed copy, as measured per CPU."""
import pytest
import torch

from eyas.config import EngineConfig
from eyas.errors import ConfigError
from eyas.layers import few_rows
from eyas.layers.few_rows import measure_mkl_rows, set_mkl_rows
from eyas.layers.linear import ReplicatedLinear, can_pack_weights, linear, pack_linear_weights

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not can_pack_weights(CPU, torch.float32), reason="no oneDNN packing on this CPU")


@needs_packing
def test_products_of_at_most_mkl_rows_take_the_plain_weight():
    """A packed copy of a zero weight shows which path ran: the plain one gives x @ W.T, the
    packed one zeros."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 64, generator=gen)  # [out, in]
    zeros_packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(w), 16)
    for mkl_rows in (0, 2, 3):
        for rows in range(1, 6):
            x = torch.randn(rows, 64, generator=gen)
            out = linear(x, w, None, zeros_packed, mkl_rows)  # [rows, 96]
            if rows <= mkl_rows:
                assert torch.equal(out, torch.nn.functional.linear(x, w)), (mkl_rows, rows)
            else:
                assert torch.count_nonzero(out) == 0, (mkl_rows, rows)
    if can_pack_weights(CPU, torch.bfloat16):  # bf16 always takes the packed copy
        bf16 = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(w, dtype=torch.bfloat16), 16)
        assert torch.count_nonzero(linear(bf16, w.to(torch.bfloat16), None, packed, 3)) == 0


def _packed_model(dtype=torch.float32) -> torch.nn.Module:
    model = torch.nn.Sequential(ReplicatedLinear(64, 96, dtype=dtype), ReplicatedLinear(96, 64, dtype=dtype))
    for m in model:
        torch.nn.init.normal_(m.weight)
    pack_linear_weights(model)
    return model


@needs_packing
@pytest.mark.parametrize("mkl_faster_up_to, expected", [(0, 0), (2, 2), (3, 3), (9, 3)])
def test_measure_keeps_mkl_while_it_wins(monkeypatch, mkl_faster_up_to, expected):
    """Timings injected: MKL takes 1 s a pass up to `mkl_faster_up_to` rows and 3 s beyond, the
    packed copy 2 s; the measurement keeps the row counts where MKL won (at most MAX_ROWS)."""
    def fake(weights, inputs, packed):
        rows = next(iter(inputs.values())).shape[0]
        return 2.0 if packed else (1.0 if rows <= mkl_faster_up_to else 3.0)

    monkeypatch.setattr(few_rows, "pass_seconds", fake)
    assert measure_mkl_rows(_packed_model()) == expected


@needs_packing
def test_measure_on_this_cpu_and_set():
    model = _packed_model()
    rows = measure_mkl_rows(model, repeats=1)
    assert 0 <= rows <= few_rows.MAX_ROWS
    set_mkl_rows(model, 2)
    assert [m.mkl_rows for m in model] == [2, 2]
    assert measure_mkl_rows(torch.nn.Sequential(ReplicatedLinear(8, 8))) == 0  # nothing packed
    if can_pack_weights(CPU, torch.bfloat16):
        assert measure_mkl_rows(_packed_model(torch.bfloat16)) == 0  # no fp32 weight to time


def test_engine_takes_the_configured_rows(tiny_engine_factory):
    engine = tiny_engine_factory(packed_weights=True, mkl_max_rows=2) if can_pack_weights(CPU, torch.float32) \
        else pytest.skip("no oneDNN packing on this CPU")
    layers = [m for m in engine.model.modules() if getattr(m, "weight_packed", None) is not None]
    assert layers and all(m.mkl_rows == 2 for m in layers)
    with pytest.raises(ConfigError, match="mkl_max_rows"):
        EngineConfig(mkl_max_rows=4)
