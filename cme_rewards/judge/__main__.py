"""``python -m cme_rewards.judge``."""

from cme_rewards.judge.cli import main

raise SystemExit(main())
