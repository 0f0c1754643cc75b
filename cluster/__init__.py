"""modelhost on a Ray cluster: one node agent per GPU node, and one router in front.

    ray start --head ...; ray start --address HEAD:6379 ...    # the Ray cluster
    modelhost cluster up --address auto [--config FILE]        # agents and the router

Ray is the cluster layer only. Each node agent (a Ray actor pinned to its node,
holding the node's GPUs) runs that node's own `modelhost up` as a child process: its
broker, supervisor and daemons, each daemon in its own venv with its own Python as on
one machine; NVML watching and the memory tiers stay per node. The router is a
broker-compatible endpoint, so `modelhost.Client(endpoint)` and every command that
takes `--endpoint` call through the cluster unchanged. See DESIGN.md beside this file.

Importing this package imports neither Ray nor the broker.
"""
