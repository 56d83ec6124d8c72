from django.apps import AppConfig


class SimulatorConfig(AppConfig):
    """An OpenAI-compatible provider simulator with fault injection.

    A Django app only so `manage.py simulate_provider` exists; the server itself
    is plain asyncio so it can outrun the gateway in benchmarks."""

    name = "simulator"
    verbose_name = "Provider simulator"
