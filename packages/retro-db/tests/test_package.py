import retro_db


def test_version_matches_metadata():
    from importlib.metadata import version

    assert retro_db.__version__ == version("retro-db")
