"""fedgov's municipal node: the Flower ClientApp (thin glue over :mod:`fedgov.node`).

The entry point is ``clients.app:app``. Its submodules are the API: :mod:`clients.app` (the
handlers) and :mod:`clients.mods` (the mods around them); nothing is re-exported here, where a
name ``app`` would be shadowed by the submodule of that name.
"""

__all__: list[str] = []
