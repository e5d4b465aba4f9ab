"""Eight simulated CPU devices for the sharding tests, set before JAX starts its backend;
and a cache directory of the session's own, so no test reads or writes the user's
(`pretrain.metrics.peak_cache_path`: the machine's measured MFU peak)."""

import jax
import pytest

from pretrain.metrics import CACHE_DIR_ENV

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="session")
def _session_cache_directory(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # os.environ: subprocesses of the tests inherit it
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("cache")))
        yield
