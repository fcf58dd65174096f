"""OpenRLHF integration: the remote-reward protocol (``protocol``) and file mode (``reward_func``).

File mode: pass the path printed by ``cme-rewards openrlhf-reward-file`` to ``--reward.remote_url``.
Server mode: run ``cme-rewards serve`` and pass ``http://127.0.0.1:5000/get_reward``.
"""
