"""Fleet sync: bring many devices to the manifest over SSH (``edgebundle sync``).

The data flow per site is the packer's own, run for a fleet:

    report (live, over SSH) → plan → pack once per state → upload → import → report

* ``states``: pure: which state a site is in (the key its bundle is cached under),
  and how many of the manifest's images it holds.
* ``bundles``: the packer's cache of fleet bundles, one per state, kept while some
  site still needs it (``home/bundles/``).
* ``device``: the commands run on a device over one SSH connection.
* ``run``: the orchestration: bounded parallelism, per-site locks, retries, outcomes.
"""
