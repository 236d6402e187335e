"""Reading the struct arrays of MATLAB annotation files (.mat) with a clear error when a field is missing."""
import numpy as np
import scipy.io

from finegrained.errors import UserError


def load_struct(path, key, fields):
    """Return {field: 1-D array} for the struct array `key` in `path`, checking every field is there."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as err:
        raise UserError(f"{path}: not a readable .mat file ({err})")
    if key not in mat:
        raise UserError(f"{path}: no '{key}' in this .mat file (found: {', '.join(k for k in mat if not k.startswith('__'))})")
    data = np.atleast_1d(mat[key])
    names = data.dtype.names or ()
    if not names:  # a plain cell array, e.g. class_names
        return data
    missing = [f for f in fields if f not in names]
    if missing:
        raise UserError(f"{path}: '{key}' has no field {', '.join(repr(f) for f in missing)} (found: {', '.join(names)})")
    return {f: data[f] for f in fields}
