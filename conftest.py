# Shared pytest fixtures live in tests/fixtures/, one module per kind of real server.
pytest_plugins = ["tests.fixtures.pacs", "tests.fixtures.xnat"]
