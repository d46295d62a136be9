"""KL of equal rows is exactly zero: a check shared by tests/test_fuzz.py (in process, every backend)
and tests/test_losses.py (the C++ kernels under each narrower vector path, in fresh processes that
import this module alone: torch and fastsd, not the test modules and what they pull in)."""
import fastsd
import torch


def equal_rows_are_exactly_zero(backend, dtypes):
    """kd_loss of a row against itself and pair_kd_loss of a pair of equal rows (CE off, both teacher
    modes): loss and gradient exactly 0, for K = 1..100 and several T. Equal rows must go through the
    same arithmetic on both sides (the C++ kernels once rounded a product on one side only, where the
    compiler contracted the other into an FMA: ~1e-8). The Triton interpreter computes in numpy, which
    contracts nothing: there only a formula that differs between the sides can show, at any K and T,
    so it runs a few (a row of one element, one in part of a block, one over several)."""
    g = torch.Generator().manual_seed(0)
    for K in (range(1, 101) if backend != "triton" else (1, 17, 100)):
        for T in ((1.0, 0.5, 4.0, 20.0, 7.3) if backend != "triton" else (0.5, 7.3)):
            for dtype in dtypes:
                s = (torch.randn(2, K, generator=g) * 3).to(dtype)
                with fastsd.use_backend(backend):
                    z = s.clone().requires_grad_()
                    loss = fastsd.kd_loss(z, s, temperature=T)
                    (gz,) = torch.autograd.grad(loss, z)
                    assert loss.item() == 0.0 and not gz.any(), ("kd_loss", K, T, dtype, loss.item())
                    for teacher in ("confident", "symmetric"):
                        zp = s[[0, 0, 1, 1]].clone().requires_grad_()
                        loss = fastsd.pair_kd_loss(zp, torch.zeros(4, dtype=torch.long), torch.tensor([1, 0, 3, 2]),
                                                   temperature=T, ce_weight=0.0, teacher=teacher)
                        (gp,) = torch.autograd.grad(loss, zp)
                        assert loss.item() == 0.0 and not gp.any(), ("pair_kd_loss", teacher, K, T, dtype, loss.item())
