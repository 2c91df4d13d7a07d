"""How a branch declares the linear layer that writes its output into the residual pathway.

A branch (attention, an FFN, anything ``(B, T, d) -> (B, T, d)``) names its output projection in
an ``output_projection`` attribute: the dotted path of a submodule (``"o_proj"``), a tuple of such
paths (several experts), or the module itself. Init scaling (depth and stream count) and the wiring
check (which zeroes every output projection to isolate the skip path) read this declaration, so a
branch of any shape and with any attribute names takes part::

    class MyMLP(nn.Module):
        output_projection = "fc_out"

        def __init__(self, dim):
            super().__init__()
            self.fc_in, self.fc_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

A path is resolved on every call, so a projection swapped after construction (for example by
:func:`~hyperbit.nn.convert_to_bitlinear`) is still the one found.
"""

from __future__ import annotations

from torch import nn

ATTRIBUTE = "output_projection"


def output_projections(branch: nn.Module) -> list[nn.Module]:
    """The output projection(s) ``branch`` declares; a ValueError naming the branch's type when
    it declares none (or names a submodule it does not have)."""
    declared = getattr(branch, ATTRIBUTE, None)
    if isinstance(declared, nn.Module):
        return [declared]
    paths = (declared,) if isinstance(declared, str) else declared
    if not isinstance(paths, (tuple, list)) or not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"branch {type(branch).__name__} declares no output projection: set its "
                         f"`{ATTRIBUTE}` to the name of the linear layer that writes its output")
    found = []
    for path in paths:
        try:
            found.append(branch.get_submodule(path))
        except AttributeError:
            raise ValueError(f"branch {type(branch).__name__} declares output projection {path!r}, "
                             "which is not one of its submodules") from None
    return found
