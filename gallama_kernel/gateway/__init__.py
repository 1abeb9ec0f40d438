"""Several models behind one address: a gateway process routes requests to one worker process per model
replica (see :mod:`.pool` and :mod:`.app`); :mod:`.worker` is the worker's entry point."""
