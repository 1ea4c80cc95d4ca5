"""Pull: a model's manifest by its tag and every blob the store lacks, through the coordinator."""

from repair.coordinator import RepairCoordinator
from repair.progress import progress_for


def pull(client, store, guard, ref, *, terminal=None, **options):
    """Download a model into the store (blobs already intact are kept); its manifest."""
    coordinator = RepairCoordinator(store, client, guard,
                                    progress=lambda label, total: progress_for(label, total, terminal),
                                    **options)
    return coordinator.pull(ref)[0]
