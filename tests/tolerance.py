"""The tolerance rule of the kernel tests: ours may not be worse than PyTorch in the input dtype, plus ``tol``.

With ``gt`` computed in float64 and ``lowprec`` by plain PyTorch in the input dtype (what a user gets by hand),
``|ours - gt| <= |lowprec - gt| + tol`` elementwise.
"""


def assert_close_to_gt(ours, gt, lowprec, tol, name=""):
    ours, gt, lowprec = (x.detach().double() for x in (ours, gt, lowprec))
    err = (ours - gt).abs()
    bound = (lowprec - gt).abs() + tol
    bad = err > bound
    if bad.any():
        worst = (err - bound).argmax()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst error "
                             f"{err.flatten()[worst]:.3e} vs bound {bound.flatten()[worst]:.3e}")
