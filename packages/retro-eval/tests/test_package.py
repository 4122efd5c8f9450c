import retro_eval


def test_version_matches_metadata():
    from importlib.metadata import version

    assert retro_eval.__version__ == version("retro-eval")
