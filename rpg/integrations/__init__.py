"""Integrations with training frameworks. Each module imports its framework (prime_rl and nemo_rl only
where it is installed: they follow its documented interface); the core never imports these.

* [`rpg.integrations.verl`][rpg.integrations.verl] — the RPG losses in verl's policy-loss registry (``pip install 'rpg-losses[verl]'``).
* [`rpg.integrations.trl`][rpg.integrations.trl] — a TRL ``GRPOTrainer`` that takes any rpg loss (``pip install 'rpg-losses[trl]'``).
* [`rpg.integrations.skyrl`][rpg.integrations.skyrl] — the RPG losses in SkyRL's policy-loss registry (Python >= 3.12).
* [`rpg.integrations.areal`][rpg.integrations.areal] — a drop-in for AReaL's PPO actor loss.
* [`rpg.integrations.prime_rl`][rpg.integrations.prime_rl] — a prime-rl custom loss (documented interface).
* [`rpg.integrations.nemo_rl`][rpg.integrations.nemo_rl] — a NeMo-RL ``LossFunction`` (documented interface).
"""
