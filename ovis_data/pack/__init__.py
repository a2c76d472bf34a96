"""The pack stage: validated catalogs -> chat/caption templates and tokens -> packed sequences -> tar shards
and a manifest (`stage.pack_stage`). The shard format it writes, which the trainer and `ovis-data inspect`
read, is not here but beside it: `ovis_data.shardformat` (the contract) and `ovis_data.shards` (the tars).
Imports nothing, so that importing one module of the package loads only what that module needs."""
