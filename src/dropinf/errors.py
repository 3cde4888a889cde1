"""One exception family, so callers (and the workflow CLI) can tell user errors from bugs."""


class DropinfError(Exception):
    """Base class: a problem with the user's input or configuration, stated plainly."""


class InvalidValueError(DropinfError, ValueError):
    """An argument or configuration value of the wrong type or outside its range; names it."""


class IntegrityError(DropinfError):
    """A stored output that is damaged or incomplete (missing or corrupt chunk, bad manifest);
    the message names the file and the command that recomputes it."""


class ShapeError(DropinfError, ValueError):
    """Tensors whose shapes or dtypes do not fit together."""


class NonFiniteError(DropinfError, ValueError):
    """NaN or inf values; the message names the offending example indices."""


class NotPositiveDefiniteError(DropinfError, ArithmeticError):
    """A damped curvature system that Cholesky cannot factor."""


class GradientCheckError(DropinfError):
    """The self-check found fused per-example gradients that disagree with autograd on this model."""


class BudgetError(DropinfError, MemoryError):
    """A request that would exceed a configured memory budget."""


def first_bad_rows(x, limit: int = 10) -> list[int]:
    """Row indices (at most `limit`) of a 2-D tensor that hold NaN or inf."""
    import torch

    bad = ~torch.isfinite(x)
    if x.dim() > 1:
        bad = bad.reshape(x.shape[0], -1).any(dim=1)
    return torch.nonzero(bad).flatten()[:limit].tolist()


def check_finite(x, what: str, offset: int = 0) -> None:
    """Raise NonFiniteError naming the example indices (shifted by `offset`) of non-finite rows."""
    import torch

    if torch.isfinite(x).all():
        return
    rows = [offset + i for i in first_bad_rows(x)]
    raise NonFiniteError(f"{what} has NaN/inf values at example indices {rows} (first {len(rows)} shown)")
