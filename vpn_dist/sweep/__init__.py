"""Ray Tune sweeps in three jobs: `space` (what to run, checked before anything starts), `driver` (the one place
that runs trials on Ray Tune, with resume) and `report` (results tables and best configs; no Ray needed)."""
