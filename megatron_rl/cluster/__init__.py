"""Ray cluster plumbing shared by the actor group and the rollout pool: starting a private local cluster
(`ray_cluster.py`) and placement groups and bundles for split and colocated modes (`placement.py`)."""
