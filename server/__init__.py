"""fedgov's coordinator: the Flower ServerApp (thin glue over :mod:`fedgov.coordinator.run`)."""
