"""``python -m cme_rewards.winrate``."""

from cme_rewards.winrate.cli import main

raise SystemExit(main())
