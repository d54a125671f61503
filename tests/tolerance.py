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


# Gradients of bf16 inputs: the gradient matmuls take the logit gradient dz rounded to bf16 (2**-9 relative), as bf16
# autograd and the Triton kernels do, and the result is rounded to bf16 once more. The same rule as the Triton tests.
BF16_GRAD_ATOL, BF16_GRAD_RTOL = 4e-3, 8e-3


def bf16_grad_tol(gt):
    """Per-element ``tol`` for a bf16 gradient against its float64 ``gt``: ``4e-3 * max|gt| + 8e-3 * |gt|``."""
    gt = gt.detach().double()
    return BF16_GRAD_ATOL * float(gt.abs().max()) + BF16_GRAD_RTOL * gt.abs()
