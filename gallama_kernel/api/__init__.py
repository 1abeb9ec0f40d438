"""HTTP layer: the app factory and routers. Routers return JSON or SSE and nothing else."""
