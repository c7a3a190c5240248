"""``ddf.chat``: the engine on each partition, with one limit across the cluster."""
