"""What a user can ask edgebundle to do, one function or session per use case.

``packer`` (needs the packer extra): plan and pack a site, record, pull and show
inventories. ``device`` (device-safe): import, report, verify, inspect. Each owns
the resources it opens and returns typed results; the CLI only parses and prints, and
fleet sync builds on the same calls.
"""
