"""fedgov's coordinator as a Flower ServerApp: thin glue over :mod:`fedgov.coordinator`.

* ``server.app:app`` (the entry point in ``pyproject.toml``): parse the run config, run one
  function (:func:`fedgov.coordinator.run_training` or :func:`fedgov.coordinator.run_query`);
* :mod:`server.config`: the run config, typed (:class:`server.config.RunConfig`).

Nothing is imported here: Flower loads ``server.app`` by its path, and ``fedgov run`` imports
this package only to find the app's directory.
"""

__all__: list[str] = []
