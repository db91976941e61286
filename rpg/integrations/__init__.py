"""Integrations with training frameworks. Each module imports its framework; the core never imports these.

* [`rpg.integrations.verl`][rpg.integrations.verl] — the RPG losses in verl's policy-loss registry (``pip install 'rpg-losses[verl]'``).
* [`rpg.integrations.trl`][rpg.integrations.trl] — a TRL ``GRPOTrainer`` that takes any rpg loss (``pip install 'rpg-losses[trl]'``).
"""
