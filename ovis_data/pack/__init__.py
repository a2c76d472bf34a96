"""The pack stage: validated catalogs -> chat/caption templates and tokens -> packed sequences -> tar shards
and a manifest (`stage.pack_stage`), and the shard format the trainer and `ovis-data inspect` read
(`shards`). Imports nothing: the training loader's workers import `ovis_data.pack.shards` alone."""
