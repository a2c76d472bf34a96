"""The slim trainer: packed shards -> micro-batches (loader), loss normalisation, the loop, `ovis-train`."""
