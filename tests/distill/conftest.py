import pytest

import toy_env


@pytest.fixture(autouse=True, scope="session")
def _toy_env():
    toy_env.register()
