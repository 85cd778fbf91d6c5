"""Allegro's spatially partitioned evaluation and MD on Ray: one actor per domain.

The model side (`shipyard_models.allegro.partition`) defines the domains, the ghosts and what a
domain computes; this package only places domains on actors and moves arrays. See `actors.py`
for the potential and `run.py` for the partitioned NVE MD stage (`python -m shipyard.md`).
"""
