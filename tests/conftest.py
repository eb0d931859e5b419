import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Each test starts with an empty global parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()
