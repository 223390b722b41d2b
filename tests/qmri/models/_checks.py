"""Checks every registered signal model must pass, shared by the per-model test modules.

A per-model module defines ``class TestXxx(ModelChecks)`` with ``model`` (an instance),
``params`` (parameter vectors inside the bounds) and ``b1`` (a relative B1+ for models whose
signal depends on it, else None); pytest then runs every ``test_*`` method below for it.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from qmri_bids.qmri.base import CLOSED_FORM, SignalModel
from qmri_bids.qmri.crb import crb, model_jacobian
from qmri_bids.qmri.estimators import ESTIMATORS
from qmri_bids.qmri.model_store import protocol_hash
from qmri_bids.qmri.models import MODELS

F64 = torch.float64


def assert_exact_jacobian(model: SignalModel, params: torch.Tensor, b1: torch.Tensor | None,
                          shape: tuple[int, ...], atol: float = 1e-9) -> None:
    """The model's own Jacobian (mode ``model``: the CRB maps and NLLS use it) equals
    ``torch.func.jacfwd`` through the simulation, signal and Jacobian alike."""
    s, jac = model_jacobian(model, params, b1, mode="model")
    s_ad, jac_ad = model_jacobian(model, params, b1, mode="fwd")
    assert jac.shape == shape
    torch.testing.assert_close(s, s_ad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, jac_ad, rtol=1e-9, atol=atol)


class ModelChecks:
    model: SignalModel
    params: tuple[list[float], ...]
    b1: float | None = None
    #: tolerance of the CRB against its finite-difference value (long EPG signals need more)
    crb_rtol: float = 1e-5

    def _params(self, dtype: torch.dtype = F64) -> torch.Tensor:
        return torch.tensor(self.params, dtype=dtype)

    def _b1(self, n: int, dtype: torch.dtype = F64) -> torch.Tensor | None:
        return None if self.b1 is None else torch.full((n,), self.b1, dtype=dtype)

    def test_registered_under_its_name(self) -> None:
        assert MODELS[self.model.name] is type(self.model)

    def test_float32_batch_shapes(self) -> None:
        p64 = self._params().expand(2, 3, -1, -1)[:, :, 0]
        s64 = self.model(p64)
        s32 = self.model(p64.float())
        assert s32.shape == s64.shape == (2, 3, s64.shape[-1])
        assert s32.dtype == (torch.complex64 if self.model.is_complex else torch.float32)
        scale = s64.abs().max().item()
        torch.testing.assert_close(s32.to(s64.dtype), s64, rtol=1e-4, atol=1e-5 * scale)

    def test_gradients_match_finite_differences(self) -> None:
        p = self._params().requires_grad_(True)
        b1 = self._b1(p.shape[0])

        def real_signal(q: torch.Tensor) -> torch.Tensor:
            s = self.model(q, b1)
            return torch.view_as_real(s) if s.is_complex() else s

        assert torch.autograd.gradcheck(real_signal, (p,), eps=1e-7, atol=1e-6, rtol=1e-5)

    def test_crb_is_positive_scales_with_noise_and_matches_finite_differences(self) -> None:
        p = self._params()
        b1 = self._b1(p.shape[0])
        exact = crb(self.model, p, 0.01, b1, mode="fwd")
        assert torch.all(torch.isfinite(exact)) and torch.all(exact > 0)
        torch.testing.assert_close(crb(self.model, p, 0.02, b1, mode="fwd"), 4 * exact,
                                   rtol=1e-9, atol=0)
        torch.testing.assert_close(crb(self.model, p, 0.01, b1, mode="fd"), exact,
                                   rtol=self.crb_rtol, atol=0)

    def test_protocol_round_trips_through_json(self) -> None:
        protocol = json.loads(json.dumps(self.model.to_protocol()))
        again = type(self.model).from_protocol(protocol)
        assert again.to_protocol() == self.model.to_protocol()
        assert protocol_hash(again.name, again.to_protocol()) == protocol_hash(
            self.model.name, self.model.to_protocol())
        p = self._params()
        torch.testing.assert_close(again(p, self._b1(p.shape[0])),
                                   self.model(p, self._b1(p.shape[0])))

    def test_declared_estimators_and_outputs_exist(self) -> None:
        cls = type(self.model)
        assert cls.estimators and all(e in ESTIMATORS for e in cls.estimators)
        assert cls.closed_form == (cls.estimators == (CLOSED_FORM,))
        p = self._params()
        data = self.model(p, self._b1(p.shape[0])).detach().numpy()
        mask = np.ones(p.shape[0], dtype=bool)
        if cls.closed_form:
            produced, algorithm = self.model.closed_form_maps(data, None, mask)
            assert algorithm
        else:
            est = self.model.estimation_model()
            values = {n: np.ones(p.shape[0]) for n in est.parameter_names}
            produced = self.model.derived_maps(values, data, None, mask)
            # the estimators see the members the estimation model describes
            n_signal = est(torch.ones(est.n_parameters, dtype=F64)).shape[-1]
            assert self.model.estimation_data(data).shape[-1] == n_signal
        missing = [o.name for o in cls.outputs if o.name not in produced]
        assert cls.outputs and not missing, f"outputs nothing produces: {missing}"

    def test_prior_covers_the_network_outputs(self) -> None:
        if type(self.model).closed_form:
            return
        est = self.model.estimation_model()
        prior = est.default_prior()
        assert prior.model_name == est.name and prior.sources
        names = set(est.parameter_names)
        assert set(prior.names) <= names
        assert prior.scale == "complex" or prior.scale in names
        shape, _ = prior.sample(64, torch.Generator().manual_seed(0))
        lower = torch.tensor([r.lower for r in prior.ranges], dtype=F64)
        upper = torch.tensor([r.upper for r in prior.ranges], dtype=F64)
        assert torch.all(shape >= lower) and torch.all(shape <= upper)
