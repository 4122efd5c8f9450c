import importlib.util

import retro_core


def test_version_matches_metadata():
    from importlib.metadata import version

    assert retro_core.__version__ == version("retro-core")


def test_install_pulls_no_database_dependencies():
    # `pip install ./packages/retro-core` must install neither faiss nor datasketch (nor retro-db).
    for name in ("faiss", "datasketch", "retro_db"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed beside retro-core"
