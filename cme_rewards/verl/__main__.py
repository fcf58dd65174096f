"""``python -m cme_rewards.verl yaml|table``: the ``reward.cme`` block with its defaults (YAML), or
the Markdown tables of its keys (see :mod:`cme_rewards.verl.settings`)."""

import sys

from cme_rewards.verl.settings import options_table, yaml_block

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "yaml"
    if what not in ("yaml", "table"):
        sys.exit("usage: python -m cme_rewards.verl yaml|table")
    print(options_table() if what == "table" else yaml_block(), end="")
