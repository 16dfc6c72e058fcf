"""One workflow, `Rollout`, in two versions (and a third that reuses v1's label with other
code), for workers that host one or the other."""
