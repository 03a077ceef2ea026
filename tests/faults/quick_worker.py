"""The shipped worker with short deadlines, so tests can watch them pass (`-k quick_worker.QuickWorker`)."""
from bus_containers_provider.worker import ProviderWorker


class QuickWorker(ProviderWorker):
    head_timeout = 1.5
    body_timeout = 2.0
