"""OpenRLHF integration: the remote-reward protocol (``protocol``) and file mode (``reward_func``).

File mode: pass the path printed by ``cme-rewards openrlhf-reward-file`` to ``--reward.remote_url``
(``--check`` first loads the verifier and scores a probe); ``compose`` sums CME with your own
reward terms in a file of yours; ``grouping`` gives a sample that cannot be scored its group's
floor (``CME_REWARDS_GROUP_SIZE``).
Server mode: run ``cme-rewards serve`` and pass ``http://127.0.0.1:5000/get_reward``.
"""
