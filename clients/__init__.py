"""fedgov's municipal node: the Flower ClientApp (thin glue over :mod:`fedgov.node`)."""
