"""Host staging of device buffers through the transport on real ranks (no GPU needed)."""

import pytest
from conftest import run_check_script

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n", [1, 3])
def test_staging_through_the_transport(n):
    run_check_script(n, "check_staging.py", f"staging checks passed on {n} ranks", timeout=90)
