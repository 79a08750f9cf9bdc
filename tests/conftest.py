pytest_plugins = [
    "tests.support.fixtures",
    "tests.support.gateway",
    "tests.support.fake_llm",
    "tests.support.events",
]
