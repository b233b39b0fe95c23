"""The Ray Data captioning pipeline: shard sources, CPU preprocessing, model replica actors, Parquet commits."""
