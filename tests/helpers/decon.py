"""A DeconIEP as if trained, for the tests of its perturbation (decon and the perturb action)."""
import torch

from gavel.decon.train import DeconIEP


def random_fitted(handle, zeta=0.05, seed=3, **params):
    """A DeconIEP whose G has random (non-zero) weights, as if trained."""
    est = DeconIEP(zeta=zeta, width=16, n_layers=2, n_heads=2, **params)
    torch.manual_seed(seed)
    g = est._new_generator(handle.d_model)
    with torch.no_grad():
        for p in g.out.parameters():
            p.normal_(0.0, 1.0)
    g.eval()
    return est._set_fitted(g, [], [], handle.fingerprint(), handle.fingerprint(), "test", 0)
