"""The one hypothesis profile of the robustness tests: a fixed seed and a bounded budget, so CI runs the same cases
every time and no example database is written."""

from hypothesis import HealthCheck, settings


def fixed(max_examples: int) -> settings:
    return settings(
        derandomize=True,
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    )
