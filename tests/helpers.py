"""Comparison helpers that explain a failure: the worst indices and any NaN/inf mismatch."""
import torch


def relative_error(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel_close(out, ref, tol, name="output"):
    """||out - ref|| / ||ref|| <= tol, with matching shapes and NaN/inf positions."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    bad_out, bad_ref = ~torch.isfinite(out64), ~torch.isfinite(ref64)
    if not torch.equal(bad_out, bad_ref):
        where = torch.nonzero(bad_out != bad_ref)[:5].tolist()
        raise AssertionError(f"{name}: non-finite mismatch at {where}")
    finite = ~bad_ref
    err = relative_error(out64[finite], ref64[finite]) if finite.any() else 0.0
    if err > tol:
        diff = (out64 - ref64).abs().masked_fill(~finite, 0).flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        rows = [(tuple(int(j) for j in torch.unravel_index(torch.tensor(i), out64.shape)), out64.flatten()[i].item(),
                 ref64.flatten()[i].item()) for i in worst.tolist()]
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst (index, out, ref): {rows}")
